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
A first line (GPU): the host's time to launch the loss at counts of positions not seen before in the process
(`first_use_host_ms`) vs the same counts again (`again_host_ms`) -- what a training step pays when a micro-batch
brings a new count (cuBLAS's work for shapes it has not met yet).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from internvl_lora.train.loss import _ChunkedLinearCrossEntropy, _chunk_grad_h, _chunk_logits


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151674)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--positions", default="221,442,884,1500")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--fresh", type=int, default=18, help="new counts of positions for the host-time line (GPU)")
    a = ap.parse_args()
    dev, dtype = a.device, torch.bfloat16
    padded = -(-a.vocab // 64) * 64
    aligned = a.vocab // 64 * 64  # the vocabulary rows in whole 64-row blocks; the rest (< 64) separately
    w = (torch.randn(a.vocab, a.width, device=dev) * 0.02).to(dtype)
    if dev == "cuda":
        # first, before anything else meets these counts; warm-up calls at 221 positions (not among them)
        for _ in range(3):
            _ChunkedLinearCrossEntropy.apply(torch.randn(221, a.width, device=dev).to(dtype), w,
                                             torch.randint(0, a.vocab, (221,), device=dev), None)
        fresh = list(range(97, 97 + 7 * a.fresh, 7))
        first, again = [], []
        for out in (first, again):
            for m in fresh:
                h = torch.randn(m, a.width, device=dev).to(dtype)
                t = torch.randint(0, a.vocab, (m,), device=dev)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                _ChunkedLinearCrossEntropy.apply(h, w, t, None)
                out.append(round((time.perf_counter() - t0) * 1e3, 2))  # host time: launches, no wait
                torch.cuda.synchronize()
        print(json.dumps(dict(fresh_positions=fresh, first_use_host_ms=first, again_host_ms=again)), flush=True)

    for m in (int(x) for x in a.positions.split(",")):
        h = torch.randn(m, a.width, device=dev).to(dtype)
        t = torch.randint(0, a.vocab, (m,), device=dev)
        g = torch.randn(m, a.vocab, device=dev).to(dtype)
        g_full = torch.randn(m, padded, device=dev).to(dtype)  # rows padded to 64, as the loss's buffer
        g_pad = g_full[:, :a.vocab]
        out_full = torch.empty(m, padded, device=dev, dtype=dtype)
        out_pad = out_full[:, :a.vocab]
        torch.mm(h, w.t(), out=out_pad)
        assert torch.equal(out_pad, h @ w.t())  # the padded output holds the same product
        grad_out = torch.empty(m, a.width, device=dev, dtype=dtype)
        ref = h.float() @ w.float().t()
        assert torch.allclose(_chunk_logits(h, w, out_full, aligned).float(), ref, atol=2e-2, rtol=2e-2)
        _chunk_grad_h(g_full, w, grad_out, aligned)
        assert torch.allclose(grad_out.float(), g_pad.float() @ w.float(), atol=0.5, rtol=2e-2)
        r = dict(positions=m, vocab=a.vocab, width=a.width, device=dev,
                 loss_ms=timed(lambda: _ChunkedLinearCrossEntropy.apply(h, w, t, None), dev, a.iters),
                 loss_chunk4x_ms=timed(lambda: _ChunkedLinearCrossEntropy.apply(h, w, t, None, 2**27), dev, a.iters),
                 logits_ms=timed(lambda: h @ w.t(), dev, a.iters),
                 logits_padded_ms=timed(lambda: torch.mm(h, w.t(), out=out_pad), dev, a.iters),
                 grad_ms=timed(lambda: g @ w, dev, a.iters),
                 grad_padded_ms=timed(lambda: g_pad @ w, dev, a.iters),
                 logits_split_ms=timed(lambda: _chunk_logits(h, w, out_full, aligned), dev, a.iters),
                 grad_split_ms=timed(lambda: _chunk_grad_h(g_full, w, grad_out, aligned), dev, a.iters))
        print(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in r.items()}), flush=True)


if __name__ == "__main__":
    main()
