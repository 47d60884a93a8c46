"""FFD warp: the separable-matmul displacement (ops.ffd.ffd_displacement) against naive evaluations of eq. 1.

    .venv/bin/python bench/ops/ffd.py                          # 16 x 1 x 128 x 128 masks, 13 x 13 mesh, CPU
    .venv/bin/python bench/ops/ffd.py --batch 32 --size 256 --repeats 15 --device cuda

Implementations (same offsets, same output up to 1e-5; the check is part of the run):

* **fast**: ``W_y @ offsets @ W_x^T`` with the cached dense B-spline matrices (two small matmuls);
* **naive_eq1**: eq. 1 per pixel: floor / fractional parts, gather the 4 x 4 supporting control points, 16
  weighted sums (vectorised over pixels, 16 Python iterations);
* **naive_loop**: loop over the 169 control points, adding each one's basis function times its offset.

Figures (milliseconds, median over ``--repeats`` interleaved repeats after one warm-up call of each):

* ``disp``: dense displacement field only;
* ``warp``: the whole warp (``ffd_warp``: displacement + identity grid + bilinear ``grid_sample``);
* ``warp_fb``: warp forward + backward (gradients wrt offsets and the masks, as in training); naive_loop only
  with ``--loop-fb`` (about 4 s a call on the 2-core dev machine).

Defaults take about 40 s on the shared 2-core development machine (medians there are noisy: other processes).

Speed-ups are naive / fast. Writes ``bench/results/ops_ffd.json``.
"""

from __future__ import annotations

import os
import sys

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(BENCH)
for _p in (ROOT, BENCH):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _results import write_result  # noqa: E402
from ops.ffd import _identity_grid, ffd_displacement, ffd_displacement_naive  # noqa: E402


def warp(masks: torch.Tensor, offsets: torch.Tensor, impl: str) -> torch.Tensor:
    h, w = masks.shape[-2:]
    if impl == "fast":
        disp = ffd_displacement(offsets, (h, w), scale=2.0)
    else:
        disp = ffd_displacement_naive(offsets, (h, w), scale=2.0, method=impl.split("_", 1)[1])
    grid = _identity_grid(h, w, offsets.device, offsets.dtype) + disp.permute(0, 2, 3, 1)
    return F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def displacement(offsets: torch.Tensor, hw: tuple[int, int], impl: str) -> torch.Tensor:
    if impl == "fast":
        return ffd_displacement(offsets, hw)
    return ffd_displacement_naive(offsets, hw, method=impl.split("_", 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=128, help="masks are size x size")
    ap.add_argument("--mesh", type=int, default=13, help="control points per axis")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--loop-fb", action="store_true", help="also time naive_loop forward+backward (slow: ~4 s a call)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=os.path.join(BENCH, "results", "ops_ffd.json"))
    args = ap.parse_args()

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    n, s, m = args.batch, args.size, args.mesh
    # masks: random ellipses; offsets: smooth-ish random normalised offsets (a few % of the mask size)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")
    ab = torch.rand(n, 2, generator=g) * 0.5 + 0.3
    masks = (((xx / ab[:, 0, None, None]) ** 2 + (yy / ab[:, 1, None, None]) ** 2) <= 1).float()[:, None].to(dev)
    offsets = (torch.randn(n, 2, m, m, generator=g) * 0.03).to(dev)

    impls = ["fast", "naive_eq1", "naive_loop"]
    # correctness first: all three agree
    ref = warp(masks, offsets, "fast")
    max_diff = {i: float((warp(masks, offsets, i) - ref).abs().max()) for i in impls[1:]}
    assert all(v < 1e-5 for v in max_diff.values()), max_diff

    def run_fb(impl: str) -> None:
        o = offsets.clone().requires_grad_()
        x = masks.clone().requires_grad_()
        warp(x, o, impl).square().sum().backward()

    cases = {
        "disp": lambda impl: displacement(offsets, (s, s), impl),
        "warp": lambda impl: warp(masks, offsets, impl),
        "warp_fb": run_fb,
    }
    case_impls = {c: impls if (c != "warp_fb" or args.loop_fb) else impls[:2] for c in cases}
    times: dict[str, dict[str, list[float]]] = {c: {i: [] for i in case_impls[c]} for c in cases}
    with torch.no_grad():
        for c in ("disp", "warp"):
            for i in impls:
                cases[c](i)  # warm-up (also fills the B-spline matrix cache)
    for i in case_impls["warp_fb"]:
        cases["warp_fb"](i)
    for _ in range(args.repeats):  # interleaved, so load from other processes hits all implementations alike
        for c, fn in cases.items():
            for i in case_impls[c]:
                sync()
                t0 = time.perf_counter()
                if c == "warp_fb":
                    fn(i)
                else:
                    with torch.no_grad():
                        fn(i)
                sync()
                times[c][i].append((time.perf_counter() - t0) * 1e3)

    med = {c: {i: statistics.median(v) for i, v in d.items()} for c, d in times.items()}
    speedup = {c: {i: med[c][i] / med[c]["fast"] for i in case_impls[c][1:]} for c in cases}

    print(f"FFD warp, {n} x 1 x {s} x {s} masks, {m} x {m} mesh, {dev.type}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} (ms)")
    print(f"{'case':<9} {'fast':>9} {'naive_eq1':>10} {'naive_loop':>11} {'x eq1':>7} {'x loop':>7}")
    for c in cases:
        loop_ms, loop_x = med[c].get("naive_loop"), speedup[c].get("naive_loop")
        print(f"{c:<9} {med[c]['fast']:>9.3f} {med[c]['naive_eq1']:>10.3f} "
              f"{'-' if loop_ms is None else f'{loop_ms:.3f}':>11} {speedup[c]['naive_eq1']:>7.1f} "
              f"{'-' if loop_x is None else f'{loop_x:.1f}':>7}")

    write_result({
        "benchmark": "ops_ffd",
        "config": {"batch": n, "channels": 1, "size": s, "mesh": m, "repeats": args.repeats, "device": str(dev),
                   "dtype": "float32"},
        "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                "machine": platform.machine(), "cpu_count": os.cpu_count(),
                "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
        "median_ms": med,
        "speedup_vs_fast": speedup,
        "max_abs_diff_vs_fast": max_diff,
        "times_ms": times,
    }, args.out)


if __name__ == "__main__":
    main()
