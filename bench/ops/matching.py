"""DMM-Net matching layer (ops.matching): accuracy vs iterations, and speed of the batched layer.

    .venv/bin/python bench/ops/matching.py                 # ~30 s on the 2-core dev machine
    .venv/bin/python bench/ops/matching.py --repeats 3 --threads 2

(a) Accuracy on random costs: ``B = 64`` problems of ``10 x 50``, ``C ~ -U(0, 1)`` (float64, seed 0), ``lr = 0.1``.
    For every ``N_grad in {5, 10, 20, 40, 80}`` x ``N_proj in {1, 3, 5, 10}``:
    * ``agree``: fraction of the 640 rows whose PGD row argmax equals scipy's Hungarian assignment;
    * ``gap``: mean over problems of ``(Tr(C X^T) - Tr(C X*^T)) / |Tr(C X*^T)|`` (X* = Hungarian). It can be
      negative: with few Dykstra cycles the PGD output is not exactly feasible (row sums above 1 lower the cost);
    * ``row_err``: mean over rows of ``|X 1 - 1|``, ``col_exc``: max over columns of ``max(X^T 1 - 1, 0)``.
    Random uniform costs are a hard case (near-ties among 50 columns); the real-mask costs of
    tests/test_ops_matching.py reach 100 % agreement at the defaults.
(b) Time (median of ``--repeats`` runs, float32, CPU, ``--threads`` torch threads) of one 64 x 10 x 50 batch at the
    paper defaults (N_grad 40, N_proj 5, lr 0.1):
    * ``pgd_batched``: ``ops.matching.match_pgd`` (forward only) and ``pgd_batched_fwd_bwd`` (forward + backward of
      the sum of the output);
    * ``pgd_loop``: a naive implementation of the same algorithm, one problem at a time in a Python loop (checked
      to give the same output);
    * ``hungarian``: ``scipy.optimize.linear_sum_assignment`` per problem (``match_hungarian``);
    * ``greedy``: ``match_greedy`` (vectorised over the batch, one step per row).

Writes bench/results/ops_matching.json.
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
for p in (ROOT, BENCH):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _results import write_result  # noqa: E402
from ops.matching import lp_objective, match_greedy, match_hungarian, match_pgd, row_assignment  # noqa: E402


def pgd_loop(cost: torch.Tensor, n_grad: int = 40, n_proj: int = 5, lr: float = 0.1) -> torch.Tensor:
    """Naive Algorithm 1: a Python loop over the problems, each solved alone on its (n, m) matrix."""
    outs = []
    for c in cost:
        n, m = c.shape
        x = torch.full_like(c, 1.0 / m)
        total = torch.zeros_like(c)
        for _ in range(n_grad):
            y = x - lr * c
            q1, q2, q3 = torch.zeros_like(c), torch.zeros_like(c), torch.zeros_like(c)
            for _ in range(n_proj):
                z = y + q1
                y1 = z - (z.sum(1, keepdim=True) - 1) / m
                q1 = z - y1
                z = y1 + q2
                y2 = z - F.relu(z.sum(0, keepdim=True) - 1) / n
                q2 = z - y2
                z = y2 + q3
                y = F.relu(z)
                q3 = z - y
            x = y
            total = total + x
        outs.append(total / n_grad)
    return torch.stack(outs)


def timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--m", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop-repeats", type=int, default=2, help="repeats for the slow per-problem loop")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the machine is shared)")
    ap.add_argument("--out", default=os.path.join(BENCH, "results", "ops_matching.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    # ---------------------------------------------------------------- (a) accuracy vs N_grad x N_proj
    g = torch.Generator().manual_seed(0)
    cost = -torch.rand(args.batch, args.n, args.m, generator=g, dtype=torch.float64)
    H = match_hungarian(cost)
    opt = lp_objective(cost, H)
    ref = row_assignment(H)
    grid = []
    print(f"(a) random costs -U(0,1), {args.batch} x {args.n} x {args.m}, lr 0.1, vs scipy Hungarian")
    print(f"{'N_grad':>6} {'N_proj':>6} {'agree':>7} {'gap':>8} {'row_err':>8} {'col_exc':>8}")
    for n_grad in (5, 10, 20, 40, 80):
        for n_proj in (1, 3, 5, 10):
            X = match_pgd(cost, n_grad=n_grad, n_proj=n_proj, lr=0.1)
            agree = (row_assignment(X) == ref).double().mean().item()
            gap = ((lp_objective(cost, X) - opt) / opt.abs()).mean().item()
            row_err = (X.sum(-1) - 1).abs().mean().item()
            col_exc = (X.sum(-2) - 1).clamp(min=0).max().item()
            grid.append(dict(n_grad=n_grad, n_proj=n_proj, agree=agree, rel_gap=gap, row_err_mean=row_err,
                             col_excess_max=col_exc))
            print(f"{n_grad:>6} {n_proj:>6} {agree:>7.3f} {gap:>+8.4f} {row_err:>8.4f} {col_exc:>8.4f}")

    # ---------------------------------------------------------------- (b) time, paper defaults
    c32 = cost.float()
    X_b = match_pgd(c32)
    X_l = pgd_loop(c32)
    max_diff = (X_b - X_l).abs().max().item()
    assert max_diff < 1e-5, f"loop and batched PGD differ by {max_diff}"

    def fwd_bwd():
        c = c32.clone().requires_grad_()
        match_pgd(c).sum().backward()

    times = {
        "pgd_batched": timeit(lambda: match_pgd(c32), args.repeats),
        "pgd_batched_fwd_bwd": timeit(fwd_bwd, args.repeats),
        "pgd_loop": timeit(lambda: pgd_loop(c32), args.loop_repeats),
        "hungarian": timeit(lambda: match_hungarian(c32), args.repeats),
        "greedy": timeit(lambda: match_greedy(c32), args.repeats),
    }
    print(f"\n(b) time per {args.batch} x {args.n} x {args.m} batch, N_grad 40, N_proj 5, float32, "
          f"{args.threads} torch thread(s), median")
    print(f"{'method':<22} {'ms/batch':>10} {'us/problem':>11} {'vs batched':>11}")
    for k, t in times.items():
        print(f"{k:<22} {1e3 * t:>10.2f} {1e6 * t / args.batch:>11.1f} {t / times['pgd_batched']:>10.2f}x")

    result = dict(
        benchmark="ops_matching",
        description="DMM-Net PGD + Dykstra matching layer: accuracy vs N_grad/N_proj and batched speed",
        setup=dict(batch=args.batch, n=args.n, m=args.m, cost="-U(0,1) float64 seed 0 (accuracy), float32 (time)",
                   lr=0.1, threads=args.threads, repeats=args.repeats, loop_repeats=args.loop_repeats,
                   torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                   cpu_count=os.cpu_count()),
        accuracy=grid,
        time_s=times,
        speedup_batched_vs_loop=times["pgd_loop"] / times["pgd_batched"],
        loop_vs_batched_max_abs_diff=max_diff,
        wall_s=time.perf_counter() - t_start,
    )
    write_result(result, args.out)


if __name__ == "__main__":
    main()
