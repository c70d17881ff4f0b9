"""Host time per call of the matmuls a LoRA step launches, at the 8B shapes, with the token count fixed
vs changing from call to call (as packed micro-batches do from step to step).

    python3 bench/host_launch_probe.py          # GPU; prints one JSON line per (op, shapes)

The GPU is not waited for inside the timed loop (a queue of 8 x 200 launches stays below the driver's
limit), so the time is the host's own: PyTorch's dispatch plus cuBLAS's choice of kernel. A large gap
between "fixed" and "varying" means the choice is redone for each new shape; a large time for both means
it is redone on every call.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def host_us(fn, ms, reps: int) -> float:
    for m in ms[:3]:
        fn(m)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k in range(reps):
        fn(ms[k % len(ms)])
    t = time.perf_counter() - t0
    torch.cuda.synchronize()
    return 1e6 * t / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--out", type=int, default=1024, help="the k/v projection's output width (a bias in Qwen2)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=200)
    a = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    top = 5632
    x_all = torch.randn(top, a.width, device=dev, dtype=dt)
    w = torch.randn(a.out, a.width, device=dev, dtype=dt) * 0.02
    bias = torch.randn(a.out, device=dev, dtype=dt)
    b = torch.randn(a.out, a.rank, device=dev, dtype=dt)
    h_all = torch.randn(top, a.rank, device=dev, dtype=dt)
    y_all = torch.empty(top, a.out, device=dev, dtype=dt)
    fixed = [top - 100] * 8
    varying = [top - 100 - 7 * k for k in range(a.reps + 3)]  # a new token count at every call
    ops = {
        "mm": lambda m: torch.mm(x_all[:m], w.t()),
        "addmm_bias": lambda m: torch.addmm(bias, h_all[:m], b.t()),
        "mm_rank": lambda m: torch.mm(h_all[:m], b.t()),
        "addmm_inplace": lambda m: y_all[:m].addmm_(x_all[:m], w.t()),
        "empty": lambda m: torch.empty(m, a.out, device=dev, dtype=dt),
    }
    for name, fn in ops.items():
        r = dict(op=name, fixed_us=round(host_us(fn, fixed, a.reps), 1), varying_us=round(host_us(fn, varying, a.reps), 1))
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
