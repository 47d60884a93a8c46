"""SFNet flow operators: batched implementations vs a naive per-position Python loop of the same formula.

    .venv/bin/python bench/ops/flow.py                    # ~20 s: batch 8, 20x20 -> 20x20, C=256, 1 thread
    .venv/bin/python bench/ops/flow.py --batch 2 --channels 64 --repeats 3

Two operators, each timed batched (``ops.sfnet``) and as a naive loop over the N*H*W source positions that applies
the paper's formula to one position at a time (the same arithmetic, float32, CPU):

* ``kernel_soft_argmax`` on an (N, 20, 20, 20, 20) correlation (beta=50, sigma=5): per position, L2-normalise the
  20x20 slice, discrete argmax, Gaussian kernel, softmax(beta * k * n), expected coordinates minus p;
* ``correlation_4d`` of two (N, C, 20, 20) feature maps: per source position, L2-normalise its feature and the
  target features, dot with all target positions, clip at 0.

Times are medians over ``--repeats`` runs (the loop side over ``max(1, repeats // 3)``) after one warm-up, with
``torch.set_num_threads(--threads)`` (1 by default: the dev box has 2 shared cores). Both sides' outputs are
compared (max abs difference reported). Writes bench/results/ops_flow.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH)
for _p in (ROOT, BENCH):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _results import write_result  # noqa: E402
from ops.sfnet import correlation_4d, kernel_soft_argmax  # noqa: E402


def naive_kernel_soft_argmax(corr: torch.Tensor, beta: float = 50.0, sigma: float = 5.0) -> torch.Tensor:
    N, H, W, H2, W2 = corr.shape
    ys, xs = torch.meshgrid(torch.arange(H2, dtype=corr.dtype), torch.arange(W2, dtype=corr.dtype), indexing="ij")
    out = torch.empty(N, 2, H, W, dtype=corr.dtype)
    for n in range(N):
        for y in range(H):
            for x in range(W):
                c = corr[n, y, x]
                s = c / c.norm().clamp_min(1e-12)
                i = int(s.argmax())
                qy, qx = i // W2, i % W2
                k = torch.exp(-((xs - qx) ** 2 + (ys - qy) ** 2) / (2 * sigma**2))
                m = torch.softmax((beta * k * s).flatten(), 0).view(H2, W2)
                out[n, 0, y, x] = (m * xs).sum() - x
                out[n, 1, y, x] = (m * ys).sum() - y
    return out


def naive_correlation_4d(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    N, C, H, W = fa.shape
    H2, W2 = fb.shape[-2:]
    out = torch.empty(N, H, W, H2, W2, dtype=fa.dtype)
    for n in range(N):
        for y in range(H):
            for x in range(W):
                f = fa[n, :, y, x]
                f = f / f.norm().clamp_min(1e-12)
                g = fb[n] / fb[n].norm(dim=0, keepdim=True).clamp_min(1e-12)
                out[n, y, x] = (f.view(C, 1, 1) * g).sum(0).clamp_min(0)  # cosines clipped at 0 (the default)
    return out


def timeit(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=20, help="feature-map side (source and target)")
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(BENCH, "results", "ops_flow.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    N, S, C = args.batch, args.size, args.channels
    loop_repeats = max(1, args.repeats // 3)

    fa, fb = torch.randn(N, C, S, S), torch.randn(N, C, S, S)
    corr = correlation_4d(fa, fb)

    rows = []
    t_b, out_b = timeit(lambda: kernel_soft_argmax(corr, 50.0, 5.0), args.repeats)
    t_l, out_l = timeit(lambda: naive_kernel_soft_argmax(corr, 50.0, 5.0), loop_repeats)
    rows.append(("kernel_soft_argmax", t_b, t_l, (out_b - out_l).abs().max().item()))

    t_b, out_b = timeit(lambda: correlation_4d(fa, fb), args.repeats)
    t_l, out_l = timeit(lambda: naive_correlation_4d(fa, fb), loop_repeats)
    rows.append(("correlation_4d", t_b, t_l, (out_b - out_l).abs().max().item()))

    print(f"N={N}, {S}x{S} -> {S}x{S}, C={C}, float32 CPU, {args.threads} thread(s); median of "
          f"{args.repeats} (batched) / {loop_repeats} (loop) runs")
    print(f"{'operator':<20}{'batched ms':>12}{'loop ms':>12}{'speed-up':>10}{'max |diff|':>12}")
    for name, tb, tl, diff in rows:
        print(f"{name:<20}{tb * 1e3:>12.2f}{tl * 1e3:>12.1f}{tl / tb:>9.0f}x{diff:>12.1e}")

    write_result({
        "benchmark": "ops_flow",
        "config": {"batch": N, "size": S, "channels": C, "dtype": "float32", "device": "cpu",
                   "threads": args.threads, "repeats_batched": args.repeats, "repeats_loop": loop_repeats,
                   "beta": 50.0, "sigma": 5.0},
        "results": [{"operator": name, "batched_s": tb, "loop_s": tl, "speedup": tl / tb, "max_abs_diff": diff}
                    for name, tb, tl, diff in rows],
        "env": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "cpu_count": os.cpu_count()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, args.out)


if __name__ == "__main__":
    main()
