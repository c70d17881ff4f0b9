"""The card's dense bf16 matmul rate, to state next to every GPU figure (the issue's reference rate).

    python3 bench/matmul_rate.py        # prints {"card": ..., "matmul_bf16_tflops": ...}

8192 x 8192 x 8192 bf16 matmuls, 10 warm-up then 50 timed with CUDA events; the best of 3 rounds.
"""

from __future__ import annotations

import json

import torch


def matmul_tflops(n: int = 8192, iters: int = 50, rounds: int = 3) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
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


if __name__ == "__main__":
    print(json.dumps({"card": torch.cuda.get_device_name(), "matmul_bf16_tflops": round(matmul_tflops())}))
