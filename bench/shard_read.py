"""WebDataset shard read throughput: each reader against a raw byte read of the same tars over the same transport.

    .venv/bin/python bench/shard_read.py
    .venv/bin/python bench/shard_read.py --shards 8 --samples 50 --kb 100 --repeats 5 --no-ray

Shards are written with ``maskflow.shards.write_shard`` (``<key>.image``: ``--kb`` KB of random bytes, i.e.
incompressible like a PNG/JPEG, plus ``<key>.json``: a small ImageMeta), to a local directory and, through
``maskflow.storage``, to a bucket on a moto S3 server started in this process on 127.0.0.1.

Readers (each touches every entry of every sample) and the raw read each is compared with (same bytes, same
transport):

=================  ======================================================  ==========================================
transport          reader                                                  raw baseline
=================  ======================================================  ==========================================
local              ``maskflow.shards.iter_shard`` (header-level reader)   ``storage.open_uri(uri).read()`` (one read)
local              ``webdataset.WebDataset(paths)`` (no decoding)          same
local              ``ray.data.read_webdataset(..., decoder=None)`` rows    ``pyarrow LocalFileSystem`` stream ``read()``
s3 (moto)          ``maskflow.shards.iter_shard`` (smart_open + boto3)     ``storage.open_uri(uri).read()`` (smart_open)
s3 (moto)          ``ray.data.read_webdataset`` with                      ``pyarrow S3FileSystem`` stream ``read()``
                   ``storage.pyarrow_filesystem(...)[0]``
=================  ======================================================  ==========================================

References, timed but not targets: ``s3.raw_get_object`` (``storage.read_bytes``: one boto3 ``get_object``),
and ``s3.raw_pyarrow_file`` (pyarrow ``open_input_file().read()``).

Every reader runs once untimed (warm-up: page cache, connections, pyarrow filesystem creation, Ray's worker pool),
then ``--repeats`` rounds, the readers round-robin in each. Times are medians; a ratio is reader throughput / raw
throughput computed per round (the two ran moments apart), then the median over rounds (and, in brackets, the ratio
of the best times): robust to a shared machine's load drifting during the run.

Local files are read from the page cache, so the local figures measure the readers' CPU cost, not a disk. Ray
figures exclude ``ray.init`` (reported as ``ray_init_s``) but include Ray Data's planning and scheduling, the reads
in worker processes (up to 2 at once) and the rows' trip to the driver. By default moto runs in a thread of this
process, so the S3 figures include the server's own Python time, which competes with the reader for this process's
GIL; ``--moto-process`` runs it in a child process instead (closer to a real, remote endpoint).

Results go to bench/results/shard_read.json (``--moto-process``: shard_read_moto_process.json).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Dummy credentials for the loopback moto endpoint only; set before Ray starts so its workers inherit them.
os.environ["AWS_ACCESS_KEY_ID"] = "maskflow-bench"
os.environ["AWS_SECRET_ACCESS_KEY"] = "maskflow-bench-secret"
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
for _var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
    os.environ.pop(_var, None)
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Callable, Iterator  # noqa: E402

import numpy as np  # noqa: E402

from _results import write_result  # noqa: E402
from maskflow import shards, storage  # noqa: E402
from maskflow.storage import StorageOptions  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "shard_read.json")


def quiet_ray_data() -> None:
    """No periodic progress lines from Ray Data (they would bury the results)."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------- data


def make_samples(shard: int, n: int, kb: int, rng: np.random.Generator) -> list[dict]:
    samples = []
    for i in range(n):
        image_id = shard * n + i + 1
        meta = {"image_id": image_id, "file_name": f"{image_id:012d}.png", "height": 256, "width": 256,
                "source": "bench", "annotations": []}
        samples.append({"__key__": f"{image_id:012d}", "image": rng.bytes(kb * 1024), "json": meta})
    return samples


# --------------------------------------------------------------------------------------------- readers
# Each returns (samples, payload bytes) so a reader that skipped data would show.


def read_raw_open(uris: list[str], options: StorageOptions) -> tuple[int, int]:
    total = 0
    for uri in uris:
        with storage.open_uri(uri, "rb", options) as f:
            total += len(f.read())
    return 0, total


def read_raw_get_object(uris: list[str], options: StorageOptions) -> tuple[int, int]:
    return 0, sum(len(storage.read_bytes(uri, options)) for uri in uris)


@functools.lru_cache(maxsize=None)
def _pyarrow_paths(uris: tuple[str, ...], options: StorageOptions):
    fs, _ = storage.pyarrow_filesystem(uris[0], options)
    locs = [storage.parse(u) for u in uris]
    return fs, [f"{loc.bucket}/{loc.path}" if loc.scheme == "s3" else loc.path for loc in locs]


def pyarrow_paths(uris: list[str], options: StorageOptions):
    """One pyarrow filesystem (as ``storage.pyarrow_filesystem`` makes it) and the paths of the URIs on it.

    Made once (in the warm-up round) and reused: creating an S3FileSystem costs ~0.3 s here, which a job pays once.
    """
    return _pyarrow_paths(tuple(uris), options)


def _read_raw_pyarrow_with(uris: list[str], options: StorageOptions, opener: str) -> tuple[int, int]:
    fs, paths = pyarrow_paths(uris, options)
    total = 0
    for path in paths:
        with getattr(fs, opener)(path) as f:
            total += len(f.read())
    return 0, total


def read_raw_pyarrow_file(uris: list[str], options: StorageOptions) -> tuple[int, int]:
    """Reference: pyarrow's random-access file (``open_input_file``) instead of the stream Ray Data opens."""
    return _read_raw_pyarrow_with(uris, options, "open_input_file")


def read_raw_pyarrow(uris: list[str], options: StorageOptions) -> tuple[int, int]:
    return _read_raw_pyarrow_with(uris, options, "open_input_stream")


def read_iter_shard(uris: list[str], options: StorageOptions) -> tuple[int, int]:
    n = total = 0
    for uri in uris:
        for sample in shards.iter_shard(uri, options):
            n += 1
            total += sum(len(v) for k, v in sample.items() if k != "__key__")
    return n, total


def read_webdataset(uris: list[str], options: StorageOptions) -> tuple[int, int]:
    import webdataset as wds

    n = total = 0
    ds = wds.WebDataset([storage.local_path(u) for u in uris], shardshuffle=False, empty_check=False)
    for sample in ds:
        n += 1
        total += sum(len(v) for k, v in sample.items() if not k.startswith("__"))
    return n, total


def read_ray(uris: list[str], options: StorageOptions) -> tuple[int, int]:
    import ray

    fs, paths = pyarrow_paths(uris, options)
    ds = ray.data.read_webdataset(paths, filesystem=fs, decoder=None)
    n = total = 0
    for row in ds.iter_rows():
        n += 1
        total += sum(len(v) for k, v in row.items() if not k.startswith("__") and isinstance(v, (bytes, bytearray)))
    return n, total


# --------------------------------------------------------------------------------------------- moto


def _moto_child(conn) -> None:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    conn.send(server.get_host_and_port())
    conn.recv()  # anything: stop
    server.stop()


class MotoEndpoint:
    """moto's ThreadedMotoServer on 127.0.0.1: in this process (default) or in a child process (``--moto-process``),
    where its Python time does not compete with the reader for this process's GIL."""

    def __init__(self, separate_process: bool):
        self.server = self.proc = self.conn = None
        if separate_process:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            self.conn, child = ctx.Pipe()
            self.proc = ctx.Process(target=_moto_child, args=(child,), daemon=True)
            self.proc.start()
            host, port = self.conn.recv()
        else:
            from moto.server import ThreadedMotoServer

            self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self.server.start()
            host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.proc is not None:
            self.conn.send("stop")
            self.proc.join(10)


# --------------------------------------------------------------------------------------------- timing


def time_readers(cases: dict[str, tuple[Callable, list[str], StorageOptions]], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in cases}
    checks: dict[str, tuple[int, int]] = {}
    for rep in range(repeats + 1):  # round 0: warm-up, untimed
        for name, (fn, uris, options) in cases.items():
            t = time.perf_counter()
            checks[name] = fn(uris, options)
            dt = time.perf_counter() - t
            if rep:
                times[name].append(dt)
        if rep:
            print(f"  round {rep}: " + ", ".join(f"{n}={v[-1]:.3f}s" for n, v in times.items()), flush=True)
    return times, checks


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--samples", type=int, default=50, help="samples per shard")
    ap.add_argument("--kb", type=int, default=100, help="image entry size (KB of random bytes)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray Data readers")
    ap.add_argument("--no-s3", action="store_true", help="skip the moto S3 endpoint")
    ap.add_argument("--moto-process", action="store_true",
                    help="run the moto server in a child process instead of a thread of this one")
    ap.add_argument("--out", default=None, help="default: bench/results/shard_read[_moto_process].json")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = RESULTS.replace(".json", "_moto_process.json") if args.moto_process else RESULTS
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's per-request lines

    tmp = tempfile.TemporaryDirectory(prefix="maskflow-bench-shards-")
    server = None
    ray_init_s = None
    try:
        rng = np.random.default_rng(0)
        local_dir = os.path.join(tmp.name, "shards")
        local_uris, nbytes = [], 0
        for s in range(args.shards):
            uri = os.path.join(local_dir, shards.shard_name(s))
            rec = shards.write_shard(uri, make_samples(s, args.samples, args.kb, rng))
            local_uris.append(uri)
            nbytes += rec["bytes"]
        nsamples = args.shards * args.samples
        local = StorageOptions()
        cases: dict[str, tuple[Callable, list[str], StorageOptions]] = {
            "local.raw": (read_raw_open, local_uris, local),
            "local.iter_shard": (read_iter_shard, local_uris, local),
            "local.webdataset": (read_webdataset, local_uris, local),
        }
        if not args.no_s3:
            server = MotoEndpoint(args.moto_process)
            s3 = StorageOptions(endpoint_url=server.url, region="us-east-1")
            storage.s3_client(s3).create_bucket(Bucket="bench")
            s3_uris = []
            for uri in local_uris:
                s3_uri = f"s3://bench/shards/{storage.basename(uri)}"
                storage.write_bytes(s3_uri, storage.read_bytes(uri), s3)
                s3_uris.append(s3_uri)
            cases.update({
                "s3.raw": (read_raw_open, s3_uris, s3),
                "s3.raw_get_object": (read_raw_get_object, s3_uris, s3),
                "s3.iter_shard": (read_iter_shard, s3_uris, s3),
            })
        if not args.no_ray:
            import ray

            t = time.perf_counter()
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            quiet_ray_data()
            ray_init_s = time.perf_counter() - t
            cases["local.raw_pyarrow"] = (read_raw_pyarrow, local_uris, local)
            cases["local.ray"] = (read_ray, local_uris, local)
            if not args.no_s3:
                cases["s3.raw_pyarrow"] = (read_raw_pyarrow, s3_uris, s3)
                cases["s3.raw_pyarrow_file"] = (read_raw_pyarrow_file, s3_uris, s3)
                cases["s3.ray"] = (read_ray, s3_uris, s3)

        print(f"{args.shards} shards x {args.samples} samples x {args.kb} KB = {nbytes / 1e6:.1f} MB; "
              f"{args.repeats} timed rounds after one warm-up", flush=True)
        times, checks = time_readers(cases, args.repeats)
        payload = checks["local.iter_shard"][1]
        for name, (n, total) in checks.items():
            if ".raw" in name:
                assert total == nbytes, (name, total, nbytes)
            else:
                assert n == nsamples and total == payload, (name, n, total, nsamples, payload)
    finally:
        if ray_init_s is not None:
            import ray

            ray.shutdown()
        if server is not None:
            server.stop()
        tmp.cleanup()

    figures = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        figures[name] = {"median_s": round(med, 4), "best_s": round(min(ts), 4), "samples_per_s": round(nsamples / med, 1),
                         "mb_per_s": round(nbytes / 1e6 / med, 1), "times_s": [round(t, 4) for t in ts]}
    pairs = [("local.iter_shard", "local.raw"), ("local.webdataset", "local.raw"),
             ("local.ray", "local.raw_pyarrow"), ("s3.iter_shard", "s3.raw"),
             ("s3.ray", "s3.raw_pyarrow"), ("s3.ray", "s3.raw_pyarrow_file")]
    # ratio = reader throughput / raw throughput, per round (the two ran seconds apart), then the median over
    # rounds: robust to the load of a shared machine drifting during the run. best_ratios: from the fastest times.
    ratios, best_ratios = {}, {}
    for reader, base in pairs:
        if reader in figures and base in figures:
            per_round = [b / r for b, r in zip(times[base], times[reader])]
            ratios[f"{reader}/{base}"] = round(statistics.median(per_round), 3)
            best_ratios[f"{reader}/{base}"] = round(min(times[base]) / min(times[reader]), 3)
    result = {
        "benchmark": "shard_read",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "params": {k: v for k, v in vars(args).items() if k != "out"},
        "data": {"shards": args.shards, "samples": nsamples, "bytes": nbytes, "payload_bytes": payload},
        "ray_init_s": round(ray_init_s, 2) if ray_init_s is not None else None,
        "figures": figures,
        "ratios": ratios,
        "best_ratios": best_ratios,
        "targets": {"local.iter_shard/local.raw": 0.8, "s3.iter_shard/s3.raw": 0.8},
    }

    print()
    print(f"{'reader':<22}{'median s':>10}{'samples/s':>12}{'MB/s':>10}   ratio to raw: median of rounds (best times)")
    for name, f in figures.items():
        keys = [f"{name}/{base}" for reader, base in pairs if reader == name and f"{name}/{base}" in ratios]
        r = ", ".join(f"{ratios[k]:.3f} ({best_ratios[k]:.3f}) vs {k.split('/')[1]}" for k in keys)
        print(f"{name:<22}{f['median_s']:>10.3f}{f['samples_per_s']:>12.1f}{f['mb_per_s']:>10.1f}   {r}")
    if ray_init_s is not None:
        print(f"ray.init: {ray_init_s:.2f}s (in no figure)")
    print("targets: iter_shard >= 0.8 of raw, local and s3: " + ", ".join(
        f"{k} {ratios[k]:.3f} {'ok' if ratios[k] >= t else 'MISSED'}" for k, t in result["targets"].items() if k in ratios))
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
