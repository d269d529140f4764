"""Can a neuron cache of quantized rows be computed on fast enough? Times, on Qwen2.5-1.5B shapes, the two
products of the sparse FFN over n cached neurons, per layer:
  project  x [M, d] @ rows[:n].T -> [M, n]   (the gate or the up coefficients; twice per layer)
  combine  a [M, n] @ down[:n]   -> [M, d]   (the FFN output, a weighted sum of down columns)
on float16 rows (as flashllm/sparse.py computes today), our int8 and int4 rows (a block of 1024 rows
expanded to float32, then one matmul), and torch's kernels: int4 `_weight_int4pack_mm_for_cpu` after
converting the rows to its layout (the conversion is paid again for rows that arrive per token) and
int8 `_weight_int8pack_mm` (one scale per row, so our rows must be requantized: also a per-token cost).
The kernels compute x @ W.T with W grouped along its rows, so they fit project only: combine would need
the down part grouped across neurons.

    python scripts/quant_kernels.py [--d 1536] [--rows 1000,2500,4500] [--tokens 1,16] [--repeat 15]
                                    [--threads 2 | --cpu-time]
"""

import argparse
import time

import torch

from flashllm.models import quant
from flashllm.models import qrows

COMPUTE_ROWS = 1024  # flashllm/sparse.py's block


def best_times(ops: dict, rounds: int, clock=time.perf_counter) -> dict:
    """Best milliseconds of each op over `rounds` rounds, each round running every op once (after one
    warm-up): the machine is shared, so samples are spread over time and the minimum is the least
    disturbed estimate of the uncontended time. `clock` time.thread_time (with one torch thread): the
    CPU time the work took, which other processes on the machine cannot inflate."""
    best = {}
    for name, fn in ops.items():
        fn()
    for _ in range(rounds):
        for name, fn in ops.items():
            start = clock()
            fn()
            best[name] = min(best.get(name, float("inf")), 1000 * (clock() - start))
    return best


def fp16_combine(a: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """sparse.py's FFN sum over float16 rows."""
    if a.shape[0] == 1:
        y = torch.zeros(1, down.shape[1])
        for start in range(0, down.shape[0], COMPUTE_ROWS):
            stop = start + COMPUTE_ROWS
            y += (a[:, start:stop].T * down[start:stop]).sum(0, keepdim=True, dtype=torch.float32)
        return y
    y = torch.zeros(a.shape[0], down.shape[1])
    for start in range(0, down.shape[0], COMPUTE_ROWS):
        stop = start + COMPUTE_ROWS
        y += a[:, start:stop].float() @ down[start:stop].float()
    return y


def products(d: int, n: int, m: int) -> dict:
    """name -> a function computing one product for n rows of d values and M = m tokens."""
    torch.manual_seed(n + m)
    w = torch.randn(n, d) * 0.02  # [n, d]: gate/up rows or down columns of n neurons
    x, a = torch.randn(m, d), torch.randn(m, n)
    half = w.half()
    q8 = qrows.from_records(qrows.to_records(qrows.quantize_rows(w, "int8")), "int8", d)
    q4 = qrows.from_records(qrows.to_records(qrows.quantize_rows(w, "int4")), "int4", d)
    work = qrows.Workspace(d, COMPUTE_ROWS)
    xh, ah = x.half(), a.half()
    k8 = qrows.to_int8_kernel(q8)
    ops = {
        "fp16 project": lambda: xh @ half.T,
        "fp16 combine": lambda: fp16_combine(ah, half),
        "int8 project": lambda: qrows.project(x, q8, work=work),
        "int8 combine": lambda: qrows.combine(a, q8, work=work),
        "int4 project": lambda: qrows.project(x, q4, work=work),
        "int4 combine": lambda: qrows.combine(a, q4, work=work),
        "int8 kernel project": lambda: k8.matmul(x),
        "int8 kernel convert": lambda: qrows.to_int8_kernel(q8),
    }
    if quant.kernel_available():
        k4 = qrows.to_int4_kernel(q4)
        ops["int4 kernel project"] = lambda: k4.matmul(x)
        ops["int4 kernel convert"] = lambda: qrows.to_int4_kernel(q4)
    return ops


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d", type=int, default=1536)
    parser.add_argument("--rows", default="1000,2500,4500")
    parser.add_argument("--tokens", default="1,16")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-time", action="store_true", help="one thread, timed by its CPU time")
    args = parser.parse_args()
    if args.cpu_time:
        args.threads = 1
    torch.set_num_threads(args.threads)
    rows = [int(v) for v in args.rows.split(",")]
    tokens = [int(v) for v in args.tokens.split(",")]
    ops = {(n, m, name): fn for m in tokens for n in rows for name, fn in products(args.d, n, m).items()}
    # every product in every round, so disturbances from other processes hit all alike
    best = best_times(ops, args.repeat, time.thread_time if args.cpu_time else time.perf_counter)
    results = {(n, m): {name: best[(n2, m2, name)] for n2, m2, name in best if (n2, m2) == (n, m)}
               for m in tokens for n in rows}
    names = list(next(iter(results.values())))
    heads = [f"n={n} M={m}" for m in tokens for n in rows]
    clock = "CPU" if args.cpu_time else "wall"
    print(f"{clock} milliseconds per product (best of {args.repeat} rounds), d={args.d}, {args.threads} threads, torch "
          f"{torch.__version__}")
    print(f"{'':<22}" + "".join(f"{h:>14}" for h in heads))
    for name in names:
        print(f"{name:<22}" + "".join(f"{results[(n, m)].get(name, float('nan')):>14.2f}"
                                      for m in tokens for n in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
