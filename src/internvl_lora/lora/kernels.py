"""Triton kernels for the LoRA input path with dropout: the dropped input is never written out.

With dropout, a LoRA layer computes `dropout(x) @ A^T`. torch's path writes a dropped copy of the layer
input and a mask, the matmul reads the copy back, and the backward draws both again and reads them
again: about a dozen passes over a (tokens x in_features) tensor per LoRA layer, for a rank-16 product.
Here the keep-mask is a function of (seed, element index) -- Philox4x32 with `PHILOX_ROUNDS` rounds, eight
16-bit draws per call (see `_triton`) -- recomputed wherever it is needed, so each kernel reads x once, and
A and gh are read where they are (any row stride), never copied:

- `lora_a_forward(x, A, seed, p, scale)`: scale * (x * keep / (1 - p)) @ A^T, tokens x r, float32;
- `lora_a_grad(gh, x, seed, p)`: gh^T @ (x * keep / (1 - p)), the gradient of A, r x in, float32 (with
  `up=`: x = silu(gate) * up formed inside, for the fused MLP's down projection);
- `lora_input_grad(gh, A, seed, p)`: (gh @ A) * keep / (1 - p), tokens x in, in gh's dtype (the caller
  adds the base layer's input gradient onto it inside the large matmul).

And the SwiGLU of the fused MLP (`fused.fuse_swiglu_mlps`) in one pass each way: `swiglu_forward(gate, up)`
and `swiglu_backward_(grad, gate, up)`.

The mask is Bernoulli(1 - p) per element like torch's dropout, from another random stream: the seed is
drawn from torch's CPU generator (`new_seed`), so `torch.manual_seed` and activation checkpointing's RNG
replay reproduce it. `dropout_keep_mask` materializes a mask, for tests. Needs triton and a CUDA device
(`available()`); the tile settings (`CONFIG`) were chosen with bench/lora_layer_bench.py on an H200.
"""

from __future__ import annotations

import functools
import importlib

import torch


@functools.cache
def available() -> bool:
    try:
        importlib.import_module("triton")
    except Exception:
        return False
    return torch.cuda.is_available()


def new_seed() -> int:
    """A seed for one dropout mask, from torch's default (CPU) generator: no GPU work, no sync."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


# Philox4x32 rounds per draw: the generator's standard 10 (torch's and Triton's too). 7 rounds made the three
# kernels 7 % faster on an H100 (0.6 % of the 8B step's GPU time; docs/benchmarks.md, 2026-12-07) -- not
# worth leaving the standard margin or changing the masks that runs already drew.
PHILOX_ROUNDS = 10

G = 32  # columns per mask part; a mask block is 8 * G columns (one Philox call per row and 8 columns)

# Tile settings per kernel and input width (narrow: < 8192 columns, wide: the MLP's down projection):
# rows per program, warps, pipeline stages, and programs per SM to aim for (the columns or rows are then
# split across programs, their float32 partial sums added atomically).
CONFIG = {
    "forward": {"narrow": dict(rows=32, warps=4, stages=3, per_sm=4), "wide": dict(rows=32, warps=4, stages=3, per_sm=8)},
    "grad_a": {"narrow": dict(rows=64, warps=4, stages=2, per_sm=4), "wide": dict(rows=32, warps=4, stages=2, per_sm=8)},
    "grad_x": {"narrow": dict(rows=128, warps=4, stages=1), "wide": dict(rows=64, warps=4, stages=1)},
}


def _config(kind: str, k: int) -> dict:
    return CONFIG[kind]["wide" if k >= 8192 else "narrow"]


def threshold(p: float) -> int:
    """p as a 16-bit threshold: an element is kept when its 16-bit random number is >= it."""
    return min(65535, max(0, round(p * 65536)))


def keep_scale(p: float) -> float:
    """1 / keep probability of the 16-bit threshold (the dropout's rescaling, exactly unbiased)."""
    return 65536.0 / (65536 - threshold(p))


@functools.cache
def _kernels():
    from . import _triton as k

    return k


def _launch(name: str, grid, *args, **meta):
    """Run the Triton kernel `name`; a failure to compile it (a triton version that miscompiles it) is
    reported with the way around it."""
    try:
        getattr(_kernels(), name)[grid](*args, **meta)
    except Exception as e:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        from ..errors import UserError

        detail = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        raise UserError(f"the Triton kernel {name} failed on this GPU / triton version ({type(e).__name__}: {detail}); "
                        "set train.lora_kernels=false to run the LoRA layers and the SwiGLU on torch's kernels") from e


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    """t itself when its columns are adjacent (any row stride: the kernels take it), else a copy."""
    return t if t.stride(1) == 1 else t.contiguous()


def _rank_block(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def supported(x: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether the kernels take this (tokens x in) input and (r x in) A: CUDA, 16-bit, contiguous rows,
    element indices within int32, rank <= 128."""
    t, k = x.shape
    return (available() and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and a.dtype == x.dtype
            and x.stride(1) == 1 and a.stride(1) == 1 and t * max(k, x.stride(0)) < 2**31 - 1 and a.shape[0] <= 128)


def _split(blocks: int, steps: int, per_sm: int, device) -> int:
    """Into how many parts to split `steps` so that blocks x parts programs fill the GPU."""
    want = per_sm * _sms(device.index or 0) if device.type == "cuda" else 1
    return max(1, min(steps, _cdiv(want, blocks)))


def lora_a_forward(x: torch.Tensor, a: torch.Tensor, seed: int, p: float, scale: float = 1.0) -> torch.Tensor:
    """scale * (x * keep / (1 - p)) @ a^T in float32 (tokens x r)."""
    t, k = x.shape
    cfg = _config("forward", k)
    r = a.shape[0]
    bm = cfg["rows"]
    blocks, nkb = _cdiv(t, bm), _cdiv(k, 8 * G)
    split = _split(blocks, nkb, cfg["per_sm"], x.device)
    per = _cdiv(nkb, split)
    split = _cdiv(nkb, per)
    out = (torch.zeros if split > 1 else torch.empty)(t, r, dtype=torch.float32, device=x.device)
    _launch("forward_kernel", (blocks, split),
        x, a, out, t, k, r, seed, threshold(p), scale * keep_scale(p), x.stride(0), a.stride(0), per,
        BM=bm, G=G, BR=_rank_block(r), SPLIT=split > 1, ROUNDS=PHILOX_ROUNDS, num_warps=cfg["warps"],
        num_stages=cfg["stages"])
    return out


def lora_a_grad(gh: torch.Tensor, x: torch.Tensor, seed: int, p: float, up: torch.Tensor | None = None) -> torch.Tensor:
    """gh^T @ (x * keep / (1 - p)) in float32 (r x in); gh is (tokens x r) in x's dtype. With `up` (same
    shape and strides as x), x is a SwiGLU's gate and the input is `swiglu_forward(x, up)`, formed in the
    kernel and never written out."""
    t, k = x.shape
    if up is not None and (up.shape != x.shape or up.stride() != x.stride() or up.dtype != x.dtype):
        raise ValueError(f"lora_a_grad: gate {tuple(x.shape)} {x.stride()} and up {tuple(up.shape)} {up.stride()} differ")
    cfg = _config("grad_a", k)
    r = gh.shape[1]
    gh = _unit_columns(gh)
    bt = cfg["rows"]
    nkb, steps = _cdiv(k, 8 * G), _cdiv(t, bt)
    split = _split(nkb, steps, cfg["per_sm"], x.device)
    per = _cdiv(steps, split) * bt
    split = _cdiv(t, per)
    out = (torch.zeros if split > 1 else torch.empty)(r, k, dtype=torch.float32, device=x.device)
    _launch("grad_a_kernel", (nkb, split),
        gh, x, x if up is None else up, out, t, k, r, seed, threshold(p), keep_scale(p), x.stride(0), gh.stride(0),
        per, BT=bt, G=G, BR=_rank_block(r), SPLIT=split > 1, SWIGLU=up is not None, ROUNDS=PHILOX_ROUNDS,
        num_warps=cfg["warps"], num_stages=cfg["stages"])
    return out


def lora_input_grad(gh: torch.Tensor, a: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """(gh @ a) * keep / (1 - p), tokens x in, in gh's dtype; gh (tokens x r) and a (r x in) of one dtype."""
    t, r = gh.shape
    k = a.shape[1]
    cfg = _config("grad_x", k)
    gh, a = _unit_columns(gh), _unit_columns(a)
    out = torch.empty(t, k, dtype=gh.dtype, device=gh.device)
    bm = cfg["rows"]
    _launch("grad_x_kernel", (_cdiv(t, bm), _cdiv(k, 8 * G)),
        out, gh, a, t, k, r, seed, threshold(p), keep_scale(p), out.stride(0), a.stride(0), gh.stride(0),
        BM=bm, G=G, BR=_rank_block(r), ROUNDS=PHILOX_ROUNDS, num_warps=cfg["warps"], num_stages=cfg["stages"])
    return out


SWIGLU_BLOCK = 4096


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in one pass (the SiLU in float32, rounded to the inputs' dtype before the product)."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(up)
    n = out.numel()
    _launch("swiglu_forward_kernel", (_cdiv(n, SWIGLU_BLOCK),), gate, up, out, n, BLOCK=SWIGLU_BLOCK, num_warps=8)
    return out


def swiglu_backward_(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """The gradients of `swiglu_forward` for the output gradient `grad`, written into `gate` and `up`
    (contiguous; their values are not needed afterwards). Returns (grad_gate, grad_up) = (gate, up)."""
    grad = grad.contiguous()
    n = gate.numel()
    _launch("swiglu_backward_kernel", (_cdiv(n, SWIGLU_BLOCK),), grad, gate, up, n, BLOCK=SWIGLU_BLOCK, num_warps=8)
    return gate, up


def dropout_keep_mask(t: int, k: int, seed: int, p: float, device) -> torch.Tensor:
    """The (t x k) keep-mask the kernels use for `seed` (bool), for tests."""
    out = torch.empty(t, k, dtype=torch.int8, device=device)
    _kernels().mask_kernel[(_cdiv(t, 64), _cdiv(k, 8 * G))](out, t, k, seed, threshold(p), BM=64, G=G,
                                                             ROUNDS=PHILOX_ROUNDS)
    return out.bool()
