"""The card's dense bf16 matmul rate, to state next to every GPU figure (the issue's reference rate).

    python3 bench/matmul_rate.py                # prints {"card": ..., "matmul_bf16_tflops": ...}
    python3 bench/matmul_rate.py --seconds 30   # also the rate the card sustains, per second, for 30 s

8192 x 8192 x 8192 bf16 matmuls, 10 warm-up then 50 timed with CUDA events; the best of 3 rounds. That is
the rate of a short burst on a card at rest; under minutes of load a card at its power limit lowers its
clock, so `--seconds` keeps it multiplying and reports the rate of each second (CUDA events around each
second's matmuls) next to the burst rate.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _operands(n: int):
    return (torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
            torch.randn(n, n, device="cuda", dtype=torch.bfloat16))


def matmul_tflops(n: int = 8192, iters: int = 50, rounds: int = 3) -> float:
    a, b = _operands(n)
    for _ in range(10):
        a @ b
    best = 0.0
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        end.synchronize()
        best = max(best, 2 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12)
    return best


def sustained_tflops(seconds: float, n: int = 8192) -> list[float]:
    """The rate of each of `seconds` consecutive seconds of back-to-back matmuls."""
    a, b = _operands(n)
    a @ b
    torch.cuda.synchronize()
    per_second = max(1, round(700e12 / (2 * n**3)))  # ~one second of matmuls at ~700 TFLOP/s
    rates = []
    for _ in range(int(seconds)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(per_second):
            a @ b
        end.record()
        end.synchronize()
        rates.append(round(2 * n**3 * per_second / (start.elapsed_time(end) / 1e3) / 1e12, 1))
    return rates


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=0, help="also measure the sustained rate for this long")
    a = ap.parse_args()
    out = {"card": torch.cuda.get_device_name(), "matmul_bf16_tflops": round(matmul_tflops())}
    if a.seconds:
        t0 = time.time()
        rates = sustained_tflops(a.seconds)
        out.update(sustained_per_second=rates, sustained_mean=round(sum(rates) / len(rates), 1),
                   sustained_last_10=round(sum(rates[-10:]) / len(rates[-10:]), 1), sustained_s=round(time.time() - t0, 1))
    print(json.dumps(out))
