"""Scheduled retraining of one model: what is new -> stages -> train -> evaluate on the pinned set -> promote only
if better (see maskflow.retrain).

    python pipelines/retrain.py --config conf/retrain/maskrcnn.yaml [key=value ...]
    python pipelines/retrain.py --config conf/retrain/maskrcnn.yaml --check     # every step's config, runs nothing
    ray job submit --working-dir . -- python pipelines/retrain.py --config conf/retrain/maskrcnn.yaml

Exit 0: promoted, not promoted (champion kept), nothing new, or another run holds the lock; the last line says which
and why, and <workdir>/<model>/status.json holds the details. Exit 1: a step failed (champion untouched; run again
to continue from that step). Exit 2: a config error.
"""

import _bootstrap  # noqa: F401  (repository on sys.path)

import sys
import traceback

from maskflow import config, runtime
from maskflow.retrain import Retrain, RetrainConfig, check


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    checking = "--check" in argv
    cfg = config.parse_cli(RetrainConfig, [a for a in argv if a != "--check"], description=__doc__)
    runtime.setup_logging()
    if checking:
        for line in check(cfg):
            print(line)
        print(f"retrain config ok: {cfg.model_name}")
        return {"result": "checked"}
    flow = Retrain(cfg, " ".join(["python pipelines/retrain.py"] + argv))
    try:
        return flow.run()
    except (config.ConfigError, config.JobFailed):
        raise
    except Exception as e:  # the step, the error and what to do in one line; the traceback in the parent run
        from maskflow import tracking

        run_id = flow.status.get("run_id")
        if run_id:
            tracking.client().log_text(run_id, traceback.format_exc(), "error.txt")
        raise config.JobFailed(flow.status.get("why") or f"{type(e).__name__}: {e}") from None


if __name__ == "__main__":
    config.main_guard(main)
