"""Triton kernels for the LoRA input path with dropout: the dropped input is never written out.

PEFT computes `dropout(x) @ A^T`: the dropout writes a dropped copy of the layer input (and a mask),
the matmul reads it back, and the backward draws and reads both again -- about ten passes over a
(tokens x in_features) tensor per LoRA layer, for a rank-16 product. Here the keep-mask is a function
of (seed, element index) (Philox, `tl.rand`), recomputed wherever it is needed, so each kernel reads x
once:

- `lora_a_forward(x, A, seed, p)`: (x * keep / (1 - p)) @ A^T, tokens x r;
- `lora_a_grad(gh, x, A-shape, seed, p)`: gh^T @ (x * keep / (1 - p)), the gradient of A, r x in;
- `add_lora_input_grad_(grad_x, gh, A, seed, p)`: grad_x += (gh @ A) * keep / (1 - p), in place.

Masks are Bernoulli(1 - p) like torch's dropout, from another random stream (seeded from torch's CPU
generator, so `torch.manual_seed` and activation checkpointing's RNG replay reproduce them).
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


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def keep_mask(seed, rows, cols, n_cols, p):
        # one uniform number per element, from its flat index; kept when >= p
        return tl.rand(seed, rows[:, None] * n_cols + cols[None, :]) >= p

    @triton.jit
    def forward_kernel(x_ptr, a_ptr, out_ptr, T, K, R, seed, p, inv_keep, stride_x, stride_a, k_per_split,
                       BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        pid_m, pid_s = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BM + tl.arange(0, BM)
        ranks = tl.arange(0, BR)
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        k0 = pid_s * k_per_split
        for k in range(k0, tl.minimum(k0 + k_per_split, K), BK):
            cols = k + tl.arange(0, BK)
            inside = (rows[:, None] < T) & (cols[None, :] < K)
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=inside, other=0.0)
            x = tl.where(keep_mask(seed, rows, cols, K, p), x, tl.zeros_like(x))
            a = tl.load(a_ptr + ranks[None, :] * stride_a + cols[:, None],
                        mask=(ranks[None, :] < R) & (cols[:, None] < K), other=0.0)  # (BK, BR) = A^T tile
            acc += tl.dot(x, a)
        acc *= inv_keep
        tl.atomic_add(out_ptr + rows[:, None] * R + ranks[None, :], acc, mask=(rows[:, None] < T) & (ranks[None, :] < R))

    @triton.jit
    def grad_a_kernel(gh_ptr, x_ptr, out_ptr, T, K, R, seed, p, inv_keep, stride_x, t_per_split,
                      BT: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        pid_k, pid_s = tl.program_id(0), tl.program_id(1)
        cols = pid_k * BK + tl.arange(0, BK)
        ranks = tl.arange(0, BR)
        acc = tl.zeros((BR, BK), dtype=tl.float32)
        t0 = pid_s * t_per_split
        for t in range(t0, tl.minimum(t0 + t_per_split, T), BT):
            rows = t + tl.arange(0, BT)
            inside = (rows[:, None] < T) & (cols[None, :] < K)
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=inside, other=0.0)
            x = tl.where(keep_mask(seed, rows, cols, K, p), x, tl.zeros_like(x))
            g = tl.load(gh_ptr + rows[None, :] * R + ranks[:, None], mask=(rows[None, :] < T) & (ranks[:, None] < R),
                        other=0.0)  # (BR, BT) = gh^T tile
            acc += tl.dot(g, x)
        acc *= inv_keep
        tl.atomic_add(out_ptr + ranks[:, None] * K + cols[None, :], acc, mask=(ranks[:, None] < R) & (cols[None, :] < K))

    @triton.jit
    def grad_x_kernel(gx_ptr, gh_ptr, a_ptr, T, K, R, seed, p, inv_keep, stride_gx, stride_a,
                      BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        pid_m, pid_k = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_k * BK + tl.arange(0, BK)
        ranks = tl.arange(0, BR)
        g = tl.load(gh_ptr + rows[:, None] * R + ranks[None, :], mask=(rows[:, None] < T) & (ranks[None, :] < R), other=0.0)
        a = tl.load(a_ptr + ranks[:, None] * stride_a + cols[None, :], mask=(ranks[:, None] < R) & (cols[None, :] < K),
                    other=0.0)
        lora = tl.dot(g, a) * inv_keep  # (BM, BK)
        lora = tl.where(keep_mask(seed, rows, cols, K, p), lora, 0.0)
        inside = (rows[:, None] < T) & (cols[None, :] < K)
        ptrs = gx_ptr + rows[:, None] * stride_gx + cols[None, :]
        gx = tl.load(ptrs, mask=inside, other=0.0)
        tl.store(ptrs, (gx.to(tl.float32) + lora).to(gx.dtype), mask=inside)

    @triton.jit
    def mask_kernel(out_ptr, T, K, seed, p, BM: tl.constexpr, BK: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BK + tl.arange(0, BK)
        keep = keep_mask(seed, rows, cols, K, p)
        tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8), mask=(rows[:, None] < T) & (cols[None, :] < K))

    return forward_kernel, grad_a_kernel, grad_x_kernel, mask_kernel


def _rank_block(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def _sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def supported(x: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether the kernels take this (tokens x in) input and (r x in) A: CUDA, 16-bit, contiguous rows,
    flat indices within int32, rank <= 128."""
    t, k = x.shape
    return (available() and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and a.dtype == x.dtype
            and x.stride(1) == 1 and a.stride(1) == 1 and t * k < 2**31 - 1 and a.shape[0] <= 128)


def lora_a_forward(x: torch.Tensor, a: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """(x * keep / (1 - p)) @ a^T in float32 (tokens x r)."""
    forward_kernel = _kernels()[0]
    t, k = x.shape
    r = a.shape[0]
    out = torch.zeros(t, r, dtype=torch.float32, device=x.device)
    bm, bk = 64, 128
    blocks = triton_cdiv(t, bm)
    split = max(1, min(triton_cdiv(k, bk), triton_cdiv(2 * _sms(x.device), blocks)))
    k_per = triton_cdiv(triton_cdiv(k, split), bk) * bk
    split = triton_cdiv(k, k_per)
    forward_kernel[(blocks, split)](x, a, out, t, k, r, seed, p, 1.0 / (1.0 - p), x.stride(0), a.stride(0), k_per,
                                    BM=bm, BK=bk, BR=_rank_block(r))
    return out


def lora_a_grad(gh: torch.Tensor, x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """gh^T @ (x * keep / (1 - p)) in float32 (r x in); gh is (tokens x r), contiguous."""
    grad_a_kernel = _kernels()[1]
    t, k = x.shape
    r = gh.shape[1]
    gh = gh.contiguous()
    out = torch.zeros(r, k, dtype=torch.float32, device=x.device)
    bt, bk = 64, 128
    blocks = triton_cdiv(k, bk)
    split = max(1, min(triton_cdiv(t, bt), triton_cdiv(2 * _sms(x.device), blocks)))
    t_per = triton_cdiv(triton_cdiv(t, split), bt) * bt
    split = triton_cdiv(t, t_per)
    grad_a_kernel[(blocks, split)](gh, x, out, t, k, r, seed, p, 1.0 / (1.0 - p), x.stride(0), t_per,
                                   BT=bt, BK=bk, BR=_rank_block(r))
    return out


def add_lora_input_grad_(grad_x: torch.Tensor, gh: torch.Tensor, a: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """grad_x += ((gh @ a) * keep / (1 - p)), in place; gh (tokens x r) and a (r x in) in grad_x's dtype."""
    grad_x_kernel = _kernels()[2]
    t, k = grad_x.shape
    r = a.shape[0]
    gh = gh.contiguous()
    bm, bk = 64, 128
    grad_x_kernel[(triton_cdiv(t, bm), triton_cdiv(k, bk))](grad_x, gh, a, t, k, r, seed, p, 1.0 / (1.0 - p),
                                                            grad_x.stride(0), a.stride(0), BM=bm, BK=bk,
                                                            BR=_rank_block(r))
    return grad_x


def dropout_keep_mask(t: int, k: int, seed: int, p: float, device) -> torch.Tensor:
    """The (t x k) keep-mask the kernels use for `seed` (bool), for tests."""
    mask_kernel = _kernels()[3]
    out = torch.empty(t, k, dtype=torch.int8, device=device)
    mask_kernel[(triton_cdiv(t, 64), triton_cdiv(k, 128))](out, t, k, seed, p, BM=64, BK=128)
    return out.bool()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
