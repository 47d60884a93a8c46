"""Reproduce one table of docs/RESULTS.md: the data stages, every method's training, inference and evaluation at the
same budget, then the table (paper number, ours, baselines) written into docs/RESULTS.md and logged to MLflow.

    python pipelines/results.py --config conf/results/hstn_cls.yaml

See maskflow.results for what a results config holds.
"""

import _bootstrap  # noqa: F401  (repository on sys.path)

import sys

from maskflow import config, runtime
from maskflow.results import ResultsConfig, run_results


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    cfg = config.parse_cli(ResultsConfig, argv, description=__doc__)
    runtime.setup_logging()
    return run_results(cfg, "python pipelines/results.py " + " ".join(argv))


if __name__ == "__main__":
    config.main_guard(main)
