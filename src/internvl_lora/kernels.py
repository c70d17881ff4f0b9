"""Triton kernels for the LoRA input path with dropout: the dropped input is never written out.

PEFT computes `dropout(x) @ A^T`: the dropout writes a dropped copy of the layer input (and a mask),
the matmul reads it back, and the backward draws and reads both again -- about fifteen passes over a
(tokens x in_features) tensor per LoRA layer, for a rank-16 product. Here the mask is drawn inside the
forward kernel (Philox) and kept as bits, and no dropped copy is ever written:

- `lora_a_forward(x, A, seed, p)`: (x * keep / (1 - p)) @ A^T, tokens x r, and the keep-mask as bits;
- `lora_a_grad(gh, x, bits, p)`: gh^T @ (x * keep / (1 - p)), the gradient of A, r x in;
- `add_lora_input_grad_(grad_x, gh, A, bits, p)`: grad_x += (gh @ A) * keep / (1 - p), in place.

Masks are Bernoulli(1 - p) like torch's dropout, with p rounded to a multiple of 1/65536 (16-bit
thresholds), from another random stream (seeded from torch's CPU generator, so `torch.manual_seed` and
activation checkpointing's RNG replay reproduce them). The forward keeps them as bits (1/16 of a bf16
input) for the backward.
`dropout_keep_mask` materializes a mask, for tests. Needs triton and a CUDA device; `available()` says.
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


MASK_BLOCK = 128  # columns per mask block; every kernel tiles the columns by it, so all draw the same mask


def threshold(p: float) -> int:
    """p as a 16-bit threshold: an element is kept when its 16-bit random number is >= it."""
    return min(65535, max(0, round(p * 65536)))


def keep_scale(p: float) -> float:
    """1 / keep probability of the 16-bit threshold (the dropout's rescaling, exactly unbiased)."""
    return 65536.0 / (65536 - threshold(p))


@functools.cache
def _kernels():
    from . import _triton_kernels as k

    return k.forward_kernel, k.grad_a_kernel, k.grad_x_kernel, k.mask_kernel


def _rank_block(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def _sms(device) -> int:
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def supported(x: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether the kernels take this (tokens x in) input and (r x in) A: CUDA, 16-bit, contiguous rows,
    flat indices within int32, rank <= 128."""
    t, k = x.shape
    return (available() and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and a.dtype == x.dtype
            and x.stride(1) == 1 and a.stride(1) == 1 and t * k < 2**31 - 1 and a.shape[0] <= 128)


def lora_a_forward(x: torch.Tensor, a: torch.Tensor, seed: int, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """((x * keep * keep_scale(p)) @ a^T in float32 (tokens x r), the keep bits (tokens x in/8 bytes))."""
    forward_kernel = _kernels()[0]
    t, k = x.shape
    r = a.shape[0]
    out = torch.zeros(t, r, dtype=torch.float32, device=x.device)
    bits = torch.empty(t, triton_cdiv(k, MASK_BLOCK) * (MASK_BLOCK // 8), dtype=torch.uint8, device=x.device)
    bm, bk = 64, MASK_BLOCK
    blocks = triton_cdiv(t, bm)
    split = max(1, min(triton_cdiv(k, bk), triton_cdiv(2 * _sms(x.device), blocks)))
    k_per = triton_cdiv(triton_cdiv(k, split), bk) * bk
    split = triton_cdiv(k, k_per)
    forward_kernel[(blocks, split)](x, a, out, bits, t, k, r, seed, threshold(p), keep_scale(p), x.stride(0),
                                    a.stride(0), k_per, BM=bm, BK=bk, BR=_rank_block(r))
    return out, bits


def lora_a_grad(gh: torch.Tensor, x: torch.Tensor, bits: torch.Tensor, p: float) -> torch.Tensor:
    """gh^T @ (x * keep * keep_scale(p)) in float32 (r x in); gh is (tokens x r), in x's dtype."""
    grad_a_kernel = _kernels()[1]
    t, k = x.shape
    r = gh.shape[1]
    gh = gh.contiguous()
    out = torch.zeros(r, k, dtype=torch.float32, device=x.device)
    bt, bk = 64, MASK_BLOCK
    blocks = triton_cdiv(k, bk)
    split = max(1, min(triton_cdiv(t, bt), triton_cdiv(2 * _sms(x.device), blocks)))
    t_per = triton_cdiv(triton_cdiv(t, split), bt) * bt
    split = triton_cdiv(t, t_per)
    grad_a_kernel[(blocks, split)](gh, x, bits, out, t, k, r, keep_scale(p), x.stride(0), t_per,
                                   BT=bt, BK=bk, BR=_rank_block(r))
    return out


def add_lora_input_grad_(grad_x: torch.Tensor, gh: torch.Tensor, a: torch.Tensor, bits: torch.Tensor,
                         p: float) -> torch.Tensor:
    """grad_x += ((gh @ a) * keep * keep_scale(p)), in place; gh (tokens x r), a (r x in) in grad_x's dtype."""
    grad_x_kernel = _kernels()[2]
    t, k = grad_x.shape
    r = a.shape[0]
    gh = gh.contiguous()
    bm, bk = 64, MASK_BLOCK
    grad_x_kernel[(triton_cdiv(t, bm), triton_cdiv(k, bk))](grad_x, gh, a, bits, t, k, r, keep_scale(p),
                                                            grad_x.stride(0), a.stride(0), BM=bm, BK=bk,
                                                            BR=_rank_block(r))
    return grad_x


def unpack_keep_bits(bits: torch.Tensor, k: int) -> torch.Tensor:
    """The (tokens x k) bool mask stored in `bits` (the layout of `_triton_kernels`), in torch, for tests."""
    t = bits.shape[0]
    g = MASK_BLOCK // 8
    shifts = torch.arange(8, device=bits.device, dtype=torch.int32)
    b = bits.view(t, -1, 1, g).to(torch.int32)  # (t, blocks, 1, g)
    keep = ((b >> shifts.view(1, 1, 8, 1)) & 1).bool()  # (t, blocks, 8, g): column block*BK + h*g + j
    return keep.reshape(t, -1)[:, :k]


def dropout_keep_mask(t: int, k: int, seed: int, p: float, device) -> torch.Tensor:
    """The (t x k) keep-mask the kernels use for `seed` (bool), for tests."""
    mask_kernel = _kernels()[3]
    out = torch.empty(t, k, dtype=torch.int8, device=device)
    mask_kernel[(triton_cdiv(t, 64), triton_cdiv(k, MASK_BLOCK))](out, t, k, seed, threshold(p), BM=64, BK=MASK_BLOCK)
    return out.bool()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
