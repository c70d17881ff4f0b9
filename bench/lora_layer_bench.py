"""One fused LoRA layer (fast._LoraLinear), forward + backward, on the GPU: torch's dropout path vs the
Triton kernels (internvl_lora.kernels), at the 8B decoder's projection shapes.

    python bench/lora_layer_bench.py [--tokens 3840]

Prints milliseconds per forward + backward for each shape and path, one JSON line each.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from internvl_lora import kernels  # noqa: E402
from internvl_lora.fast import _LoraLinear  # noqa: E402

SHAPES = {"q/o (3584->3584)": (3584, 3584), "k/v (3584->512)": (3584, 512), "gate/up (3584->18944)": (3584, 18944),
          "down (18944->3584)": (18944, 3584)}


def time_layer(t, k, n, triton, reps=20):
    supported = kernels.supported
    if not triton:
        kernels.supported = lambda *a: False
    try:
        bf = torch.bfloat16
        x = torch.randn(t, k, device="cuda", dtype=bf, requires_grad=True)
        w = torch.randn(n, k, device="cuda", dtype=bf) / 50
        a = torch.randn(16, k, device="cuda", requires_grad=True)
        b = torch.randn(n, 16, device="cuda", requires_grad=True)
        g = torch.randn(t, n, device="cuda", dtype=bf)
        for _ in range(3):
            _LoraLinear.apply(x, w, None, a, b, 2.0, 0.05, bf).backward(g)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            _LoraLinear.apply(x, w, None, a, b, 2.0, 0.05, bf).backward(g)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps
    finally:
        kernels.supported = supported


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=3840)
    a = ap.parse_args()
    for name, (k, n) in SHAPES.items():
        torch_ms = time_layer(a.tokens, k, n, False)
        triton_ms = time_layer(a.tokens, k, n, True)
        print(json.dumps({"shape": name, "tokens": a.tokens, "torch_ms": round(torch_ms, 3),
                          "triton_ms": round(triton_ms, 3), "saved_ms": round(torch_ms - triton_ms, 3)}), flush=True)
