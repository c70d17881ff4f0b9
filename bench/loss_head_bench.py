"""Time the training loss's output layer alone (the chunked loss, `train.loss._ChunkedLinearCrossEntropy`) at
the 8B head shape, and the two matmuls it runs with the vocabulary's own row length vs rows padded to 64.

    python3 bench/loss_head_bench.py                       # GPU: vocab 151,674 x 4,096, bf16
    python3 bench/loss_head_bench.py --vocab 1003 --width 64 --positions 37 --device cpu   # a smoke run

Prints one JSON line per count of trained positions: milliseconds per call (CUDA events on a GPU) of the
chunked loss (forward, which also forms the gradients), of `h @ W^T` into a contiguous vs a padded buffer,
and of `g @ W` from a contiguous vs a padded gradient; `*_split_ms`: the same products with the vocabulary
cut at its last multiple of 64 (every size and stride of the large matmul a multiple of 64) plus a small
rest; `loss_chunk4x_ms`: the loss with chunks four times as long. Run it with PYTHONPATH pointing at either
tree to compare two implementations of the loss.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from internvl_lora.train.loss import _ChunkedLinearCrossEntropy


def timed(fn, device: str, n: int) -> float:
    for _ in range(2):
        fn()
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / n
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) * 1e3 / n


def split_logits(h, w, out, aligned):
    """h @ w^T into `out` (rows padded to 64): the first `aligned` columns in one matmul whose sizes and
    strides are all multiples of 64, the last few in a small one."""
    torch.mm(h, w[:aligned].t(), out=out[:, :aligned])
    if aligned < w.shape[0]:
        torch.mm(h, w[aligned:].t(), out=out[:, aligned:w.shape[0]])
    return out


def split_grad(g, w, aligned):
    """g @ w with the reduction over the vocabulary split the same way (g: rows padded to 64)."""
    out = g[:, :aligned] @ w[:aligned]
    if aligned < w.shape[0]:
        out.addmm_(g[:, aligned:w.shape[0]], w[aligned:])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151674)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--positions", default="221,442,884,1500")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    dev, dtype = a.device, torch.bfloat16
    padded = -(-a.vocab // 64) * 64
    aligned = a.vocab // 64 * 64  # the vocabulary rows in whole 64-row blocks; the rest (< 64) separately
    w = (torch.randn(a.vocab, a.width, device=dev) * 0.02).to(dtype)
    for m in (int(x) for x in a.positions.split(",")):
        h = torch.randn(m, a.width, device=dev).to(dtype)
        t = torch.randint(0, a.vocab, (m,), device=dev)
        g = torch.randn(m, a.vocab, device=dev).to(dtype)
        g_pad = torch.randn(m, padded, device=dev).to(dtype)[:, :a.vocab]
        out_pad = torch.empty(m, padded, device=dev, dtype=dtype)[:, :a.vocab]
        torch.mm(h, w.t(), out=out_pad)
        assert torch.equal(out_pad, h @ w.t())  # the padded output holds the same product
        ref = (h.float() @ w.float().t())
        assert torch.allclose(split_logits(h, w, out_pad, aligned).float(), ref, atol=2e-2, rtol=2e-2)
        assert torch.allclose(split_grad(g_pad, w, aligned).float(), g_pad.float() @ w.float(), atol=0.5, rtol=2e-2)
        r = dict(positions=m, vocab=a.vocab, width=a.width, device=dev,
                 loss_ms=timed(lambda: _ChunkedLinearCrossEntropy.apply(h, w, t, None), dev, a.iters),
                 loss_chunk4x_ms=timed(lambda: _ChunkedLinearCrossEntropy.apply(h, w, t, None, 2**27), dev, a.iters),
                 logits_ms=timed(lambda: h @ w.t(), dev, a.iters),
                 logits_padded_ms=timed(lambda: torch.mm(h, w.t(), out=out_pad), dev, a.iters),
                 grad_ms=timed(lambda: g @ w, dev, a.iters),
                 grad_padded_ms=timed(lambda: g_pad @ w, dev, a.iters),
                 logits_split_ms=timed(lambda: split_logits(h, w, out_pad, aligned), dev, a.iters),
                 grad_split_ms=timed(lambda: split_grad(g_pad, w, aligned), dev, a.iters))
        print(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in r.items()}), flush=True)


if __name__ == "__main__":
    main()
