"""One LoRA projection, forward + backward, on the GPU at the 8B decoder's shapes: what the LoRA branch
costs on top of the frozen base projection, and what each variant of it costs.

    python bench/lora_layer_bench.py [--tokens 3840] [--variants base,torch,kernels,nodrop] [--sweep]

Variants (milliseconds per forward + backward, input gradient included, the same random data):
- base: the frozen projection alone (y = x W^T, grad_x = g W): the floor;
- torch: `lora.fused._LoraLinear` with torch's dropout (dropout 0.05);
- kernels: the same with the dropout inside the Triton kernels (`internvl_lora.lora.kernels`), as training
  runs it on a GPU;
- nodrop: without dropout (what the dropout's mask costs).
Prints one JSON line per shape. --sweep first times each Triton kernel alone over a grid of tile
settings at each input width (one JSON line per kernel and width: the best setting, its time, and the
time a pass over the input at 4 TB/s would take), and then runs the variants with the best settings.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from internvl_lora.lora import fused  # noqa: E402

SHAPES = {"q/o": (3584, 3584), "k/v": (3584, 512), "gate/up": (3584, 18944), "down": (18944, 3584)}


def _step(variant, x, w, a, b, g):
    if variant == "base":
        F.linear(x, w).backward(g)
    elif variant == "nodrop":
        fused._LoraLinear.apply(x, w, None, a, b, 2.0, 0.0, x.dtype).backward(g)
    else:
        fused._LoraLinear.apply(x, w, None, a, b, 2.0, 0.05, x.dtype, variant == "kernels").backward(g)


def time_ms(variant, t, k, n, reps=20):
    bf = torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(t, k, device="cuda", dtype=bf, requires_grad=True)
    w = torch.randn(n, k, device="cuda", dtype=bf) / 50
    a = torch.randn(16, k, device="cuda", requires_grad=True)
    b = torch.randn(n, 16, device="cuda", requires_grad=True)
    g = torch.randn(t, n, device="cuda", dtype=bf)
    for _ in range(3):
        _step(variant, x, w, a, b, g)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        _step(variant, x, w, a, b, g)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _kernel_ms(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def sweep(t):
    """Each kernel alone, every tile setting of the grid, at the two input widths, for each mask part
    width G; sets kernels.G and kernels.CONFIG to the fastest and prints them."""
    import copy
    import itertools

    from internvl_lora.lora import kernels

    bf = torch.bfloat16
    grid = {"forward": [dict(rows=r, warps=w, stages=s, per_sm=m) for r, w, s, m in
                        itertools.product((32, 64, 128), (4, 8), (2, 3), (2, 4, 8))],
            "grad_a": [dict(rows=r, warps=w, stages=s, per_sm=m) for r, w, s, m in
                       itertools.product((32, 64, 128), (4, 8), (2, 3), (2, 4, 8))],
            "grad_x": [dict(rows=r, warps=w, stages=1) for r, w in itertools.product((32, 64, 128), (4, 8))]}
    uses = {"narrow": 6, "wide": 1}  # projections per decoder layer reading a 3,584- or an 18,944-wide input
    best_total, best = None, None
    for g in (16, 32):
        kernels.G = g
        total = 0.0
        for width, k in (("narrow", 3584), ("wide", 18944)):
            x = torch.randn(t, k, device="cuda", dtype=bf)
            a = torch.randn(16, k, device="cuda", dtype=bf) / 10
            gh = torch.randn(t, 16, device="cuda", dtype=bf)
            calls = {"forward": lambda: kernels.lora_a_forward(x, a, 7, 0.05, 2.0),
                     "grad_a": lambda: kernels.lora_a_grad(gh, x, 7, 0.05),
                     "grad_x": lambda: kernels.lora_input_grad(gh, a, 7, 0.05)}
            one_pass_ms = x.numel() * 2 / 4e12 * 1e3
            for kind, settings in grid.items():
                times = []
                for cfg in settings:
                    kernels.CONFIG[kind][width] = cfg
                    try:
                        times.append((_kernel_ms(calls[kind]), cfg))
                    except Exception as e:  # a setting that does not compile is skipped
                        print(json.dumps({"kernel": kind, "width": k, "G": g, "cfg": cfg, "error": repr(e)[:200]}),
                              flush=True)
                if not times:
                    total = float("inf")
                    continue
                times.sort(key=lambda tc: tc[0])
                kernels.CONFIG[kind][width] = times[0][1]
                total += uses[width] * times[0][0]
                print(json.dumps({"kernel": kind, "width": k, "G": g, "tokens": t, "best_ms": round(times[0][0], 4),
                                  "best": times[0][1], "worst_ms": round(times[-1][0], 4),
                                  "one_pass_at_4TBps_ms": round(one_pass_ms, 4),
                                  "top3": [(round(ms, 4), c) for ms, c in times[:3]]}), flush=True)
        if best_total is None or total < best_total:
            best_total, best = total, (g, copy.deepcopy(kernels.CONFIG))
    kernels.G, kernels.CONFIG = best[0], best[1]
    print(json.dumps({"G": kernels.G, "config": kernels.CONFIG, "layer_kernels_ms": round(best_total, 4)}), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=3840)
    ap.add_argument("--sweep", action="store_true", help="tune the Triton kernels' tile settings first")
    ap.add_argument("--variants", default="base,torch,kernels,nodrop")
    a = ap.parse_args()
    if a.sweep:
        sweep(a.tokens)
    variants = [v for v in a.variants.split(",") if v]
    total = dict.fromkeys(variants, 0.0)
    per_layer = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}  # projections of one decoder layer
    for name, (k, n) in SHAPES.items():
        row = {"shape": name, "tokens": a.tokens}
        for v in variants:
            try:
                row[v] = round(time_ms(v, a.tokens, k, n), 3)
                total[v] += per_layer[name] * row[v]
            except Exception as e:  # a failing variant must not hide the others
                row[v] = repr(e)[:300]
        print(json.dumps(row), flush=True)
    print(json.dumps({"shape": "decoder layer (7 projections)", "tokens": a.tokens,
                      **{v: round(ms, 3) for v, ms in total.items()}}), flush=True)
