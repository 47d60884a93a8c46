"""DVIS ops: the stratified permutation-invariant pair loss and 1-D mean-shift, fast versions vs naive references.

    .venv/bin/python bench/ops/dvis.py
    .venv/bin/python bench/ops/dvis.py --threads 2 --repeats 5

Inputs are real: the instance ids of Penn-Fudan ``PennPed00009_mask.png`` (7 pedestrians), resized (nearest) to the
map size, and a label map ``f = ids + N(0, 0.1)`` (float32 for the loss, float64 for mean-shift).

1. **Pair loss, 128 x 128** (``ops.dvis.permutation_invariant_loss``, foreground pairs only, mean reduction):

   * ``fast_stratified``: the paper's 284 stratified offsets (w = 129, c = 8, r = 8), forward, and forward +
     backward (custom O(HW)-memory autograd and plain autograd);
   * ``fast_dense_window``: all 8,320 offsets of the 129 x 129 window (every pair within the window), forward;
   * ``naive_dense_window``: ``permutation_invariant_loss_naive`` (explicit enumeration of pixel-index pairs,
     filtered to the window) — the dense all-pairs reference. Its cost is the same for every anchor pixel (each
     anchor is compared with all H*W pixels before filtering), so it is timed on ``--naive-rows`` evenly spaced
     anchor rows and **extrapolated linearly** to all 128 rows (stated in the output as ``extrapolated``).
     Equality fast == naive is checked in full, in float64, on a 32 x 32 crop (``check_32``).
   * ``naive_stratified``: the same enumeration filtered to the 284 stratified offsets (same extrapolation).

2. **Mean-shift, 256 x 256** (65,536 values, bandwidth 0.9 = window width, i.e. radius 0.45):
   ``ops.dvis.mean_shift_1d`` (sort + prefix sums + searchsorted over bin seeds) on all values, and ``discretize``
   (0.9 then 0.4 refinement + size filter) on the map; vs ``mean_shift_1d_naive`` (every value a seed, dense
   ``(P, P)`` comparisons per iteration) on random subsamples of ``--naive-sub`` values, **extrapolated as
   P^2** (x (65536 / sub)^2) to the full map; the naive and fast modes are compared on the subsample.

Times are medians of ``--repeats`` runs after one warm-up, with ``torch.set_num_threads(--threads)``.
Results: bench/results/ops_dvis.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench")
for _p in (ROOT, BENCH):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _results import write_result  # noqa: E402
from ops.dvis import (  # noqa: E402
    discretize,
    mean_shift_1d,
    mean_shift_1d_naive,
    pair_offsets,
    permutation_invariant_loss,
    permutation_invariant_loss_naive,
)

MASK = os.path.join(os.path.dirname(ROOT), "shared", "data", "penn_fudan_ped", "PedMasks", "PennPed00009_mask.png")


def load_ids(size: int) -> torch.Tensor:
    from PIL import Image

    m = torch.from_numpy(np.array(Image.open(MASK)).astype(np.int64))
    return F.interpolate(m[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()


def agreement(gt: np.ndarray, pred: np.ndarray) -> float:
    """Pixel agreement up to a permutation of ids (Hungarian matching on the contingency table)."""
    from scipy.optimize import linear_sum_assignment

    c = np.zeros((gt.max() + 1, pred.max() + 1))
    np.add.at(c, (gt.ravel(), pred.ravel()), 1)
    r, k = linear_sum_assignment(-c)
    return float(c[r, k].sum() / gt.size)


def timeit(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def table(title: str, rows: list, cols: list) -> None:
    print(f"\n{title}")
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))


def bench_pair_loss(args) -> dict:
    H = W = 128
    ids = load_ids(H)[None]
    g = torch.Generator().manual_seed(0)
    f = (ids.float() + 0.1 * torch.randn(ids.shape, generator=g))[:, None]
    strat = pair_offsets(129, 8, 8)
    dense = pair_offsets(129, 64, 0)  # every offset of the window, one per {o, -o}
    rows = []

    def fwd(off, me=True):
        return lambda: permutation_invariant_loss(f, ids, off, memory_efficient=me)

    def fwd_bwd(off, me):
        def run():
            x = f.clone().requires_grad_(True)
            permutation_invariant_loss(x, ids, off, memory_efficient=me).backward()
        return run

    t = timeit(fwd(strat), args.repeats)
    rows.append(dict(name="fast_stratified fwd", offsets=len(strat), seconds=round(t, 4), measured="full"))
    t = timeit(fwd_bwd(strat, True), args.repeats)
    rows.append(dict(name="fast_stratified fwd+bwd (O(HW) mem)", offsets=len(strat), seconds=round(t, 4),
                     measured="full"))
    t = timeit(fwd_bwd(strat, False), args.repeats)
    rows.append(dict(name="fast_stratified fwd+bwd (autograd)", offsets=len(strat), seconds=round(t, 4),
                     measured="full"))
    t_dense = timeit(fwd(dense), max(1, args.repeats // 2))
    rows.append(dict(name="fast_dense_window fwd", offsets=len(dense), seconds=round(t_dense, 4), measured="full"))

    n = args.naive_rows
    sub_rows = [int(round(i * (H - 1) / max(n - 1, 1))) for i in range(n)]
    scale = H / n
    for label, kw in (("naive_dense_window fwd", dict(window=129)), ("naive_stratified fwd", dict(offsets=strat))):
        t = timeit(lambda: permutation_invariant_loss_naive(f, ids, anchor_rows=sub_rows, reduction="sum", **kw),
                   max(1, args.repeats // 2))
        rows.append(dict(name=label, offsets=len(dense) if "dense" in label else len(strat),
                         seconds=round(t * scale, 4), measured=f"extrapolated x{scale:g} from {n}/{H} anchor rows"))

    # equality on a 32 x 32 crop, in full
    fc, ic = f[..., 40:72, 40:72].double(), ids[:, 40:72, 40:72]
    d_fast = permutation_invariant_loss(fc, ic, pair_offsets(129, 64, 0)).item()
    d_naive = permutation_invariant_loss_naive(fc, ic, window=129).item()
    s_fast = permutation_invariant_loss(fc, ic, strat).item()
    s_naive = permutation_invariant_loss_naive(fc, ic, offsets=strat).item()
    by = {r["name"]: r["seconds"] for r in rows}
    speed = {
        "naive_dense / fast_dense (same pairs)": by["naive_dense_window fwd"] / by["fast_dense_window fwd"],
        "naive_stratified / fast_stratified (same pairs)": by["naive_stratified fwd"] / by["fast_stratified fwd"],
        "naive_dense / fast_stratified (paper's sampling)": by["naive_dense_window fwd"] / by["fast_stratified fwd"],
    }
    table("Pair loss, 128x128, PennPed00009 ids + N(0,0.1), foreground pairs, float32", rows,
          ["name", "offsets", "seconds", "measured"])
    for k, v in speed.items():
        print(f"  speed-up {k}: {v:.1f}x")
    check = dict(dense_fast=d_fast, dense_naive=d_naive, stratified_fast=s_fast, stratified_naive=s_naive,
                 dense_rel_err=abs(d_fast - d_naive) / abs(d_naive), strat_rel_err=abs(s_fast - s_naive) / abs(s_naive))
    print(f"  check on 32x32 crop (float64): dense fast {d_fast:.12g} naive {d_naive:.12g}; "
          f"stratified fast {s_fast:.12g} naive {s_naive:.12g}")
    return dict(map=[H, W], rows=rows, speedups={k: round(v, 2) for k, v in speed.items()}, check_32=check)


def bench_mean_shift(args) -> dict:
    S = 256
    ids = load_ids(S)
    g = torch.Generator().manual_seed(1)
    f = ids.double() + 0.1 * torch.randn(ids.shape, generator=g, dtype=torch.float64)
    vals = f.reshape(-1)
    P = vals.numel()
    rows = []
    t = timeit(lambda: mean_shift_1d(vals, 0.9), args.repeats)
    lab, modes = mean_shift_1d(vals, 0.9)
    rows.append(dict(name="fast mean_shift_1d (bw 0.9)", values=P, seconds=round(t, 4), measured="full",
                     modes=len(modes)))
    t = timeit(lambda: discretize(f), args.repeats)
    seg = discretize(f)
    agree = agreement(ids.numpy(), seg.numpy())
    rows.append(dict(name="fast discretize (0.9 -> 0.4, size filter)", values=P, seconds=round(t, 4),
                     measured="full", modes=int(seg.max())))
    gen = torch.Generator().manual_seed(2)
    subs = {}
    for sub in args.naive_sub:
        idx = torch.randperm(P, generator=gen)[:sub]
        v = vals[idx]
        tn = timeit(lambda: mean_shift_1d_naive(v, 0.9), max(1, args.repeats // 2))
        tf = timeit(lambda: mean_shift_1d(v, 0.9), args.repeats)
        ln, mn = mean_shift_1d_naive(v, 0.9)
        lf, mf = mean_shift_1d(v, 0.9)
        same = len(mn) == len(mf) and bool(torch.allclose(mn, mf.double(), atol=1e-2)) and bool(torch.equal(ln, lf))
        scale = (P / sub) ** 2
        rows.append(dict(name=f"naive O(P^2) mean-shift, sub {sub}", values=sub, seconds=round(tn, 4),
                         measured="full (subsample)", modes=len(mn)))
        rows.append(dict(name=f"fast mean_shift_1d, sub {sub}", values=sub, seconds=round(tf, 4),
                         measured="full (subsample)", modes=len(mf)))
        rows.append(dict(name=f"naive O(P^2) mean-shift -> {P}", values=P, seconds=round(tn * scale, 2),
                         measured=f"extrapolated x{scale:g} (P^2) from {sub}"))
        subs[sub] = dict(naive_s=tn, fast_s=tf, same_modes_and_labels=same, naive_extrapolated_full_s=tn * scale)
    table("Mean-shift, 256x256 (65,536 values), PennPed00009 ids + N(0,0.1), float64", rows,
          ["name", "values", "seconds", "measured", "modes"])
    best = max(subs)
    sp = subs[best]["naive_extrapolated_full_s"] / rows[0]["seconds"]
    print(f"  speed-up naive (extrapolated from {best}) / fast mean_shift_1d on 65,536 values: {sp:.0f}x")
    print(f"  discretize pixel agreement with the ids (up to a permutation): {agree:.5f}; naive == fast on subsamples: "
          f"{ {k: v['same_modes_and_labels'] for k, v in subs.items()} }")
    return dict(map=[S, S], rows=rows, subsamples=subs, speedup_naive_extrapolated_over_fast=round(sp, 1),
                discretize_agreement=agree)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-rows", type=int, default=8)
    ap.add_argument("--naive-sub", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--out", default=os.path.join(BENCH, "results", "ops_dvis.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = dict(
        bench="ops_dvis",
        torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
        threads=args.threads, repeats=args.repeats, device="cpu",
        pair_loss=bench_pair_loss(args),
        mean_shift=bench_mean_shift(args),
    )
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"\ntotal {result['total_seconds']} s")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
