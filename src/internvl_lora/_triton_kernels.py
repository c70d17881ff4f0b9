"""The Triton source of `internvl_lora.kernels` (imported only when the kernels are used: it needs triton).

Mask layout: columns are taken in blocks of BK (= kernels.MASK_BLOCK); within a block, column
h * G + g (G = BK / 8, h < 8) is bit h of byte (row, block * G + g). The forward draws the bits (one
Philox call per byte: 128 random bits, eight 16-bit numbers compared with the threshold) and stores
them; the backward kernels read them (T x K / 8 bytes, a sixteenth of a bf16 input).
"""

import triton
import triton.language as tl


@triton.jit
def _draw(seed, rows, kb, nkb, thr, BM: tl.constexpr, BK: tl.constexpr):
    """(keep mask (BM, BK), its packed bytes (BM, BK // 8)) for block kb of these rows."""
    G: tl.constexpr = BK // 8
    g = tl.arange(0, G)
    r0, r1, r2, r3 = tl.randint4x(seed, (rows[:, None] * nkb + kb) * G + g[None, :])
    h = tl.arange(0, 8)[None, :, None]
    word = tl.where(h < 2, r0[:, None, :], tl.where(h < 4, r1[:, None, :],
                                                    tl.where(h < 6, r2[:, None, :], r3[:, None, :])))
    keep = ((word >> ((h % 2) * 16).to(tl.uint32)) & 0xFFFF) >= thr  # (BM, 8, G)
    packed = tl.sum(keep.to(tl.int32) << h, axis=1)  # (BM, G)
    return tl.reshape(keep, (BM, BK)), packed.to(tl.uint8)


@triton.jit
def _unpack(bits_ptr, rows, kb, T, nkb, BM: tl.constexpr, BK: tl.constexpr):
    G: tl.constexpr = BK // 8
    g = tl.arange(0, G)
    byte = tl.load(bits_ptr + rows[:, None] * (nkb * G) + kb * G + g[None, :], mask=rows[:, None] < T, other=0)
    h = tl.arange(0, 8)[None, :, None]
    keep = ((byte.to(tl.int32)[:, None, :] >> h) & 1) != 0
    return tl.reshape(keep, (BM, BK))


@triton.jit(do_not_specialize=["T", "seed"])
def forward_kernel(x_ptr, a_ptr, out_ptr, bits_ptr, T, K, R, seed, thr, scale, stride_x, stride_a, k_per_split,
                   BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    """out (T x R, float32, zeroed) += (x * keep * scale) @ A^T over this program's column range; the
    keep bits of (these rows, these column blocks) go to bits."""
    G: tl.constexpr = BK // 8
    pid_m, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    ranks = tl.arange(0, BR)
    nkb = tl.cdiv(K, BK)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    k0 = pid_s * k_per_split
    for k in range(k0, tl.minimum(k0 + k_per_split, K), BK):
        cols = k + tl.arange(0, BK)
        inside = (rows[:, None] < T) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=inside, other=0.0)
        keep, packed = _draw(seed, rows, k // BK, nkb, thr, BM, BK)
        tl.store(bits_ptr + rows[:, None] * (nkb * G) + (k // BK) * G + tl.arange(0, G)[None, :], packed,
                 mask=rows[:, None] < T)
        x = tl.where(keep, x, tl.zeros_like(x))
        a = tl.load(a_ptr + ranks[None, :] * stride_a + cols[:, None],
                    mask=(ranks[None, :] < R) & (cols[:, None] < K), other=0.0)  # (BK, BR) = A^T tile
        acc += tl.dot(x, a)
    acc *= scale
    tl.atomic_add(out_ptr + rows[:, None] * R + ranks[None, :], acc, mask=(rows[:, None] < T) & (ranks[None, :] < R))


@triton.jit(do_not_specialize=["T"])
def grad_a_kernel(gh_ptr, x_ptr, bits_ptr, out_ptr, T, K, R, scale, stride_x, t_per_split,
                  BT: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    """out (R x K, float32, zeroed) += gh^T @ (x * keep * scale) over this program's rows."""
    pid_k, pid_s = tl.program_id(0), tl.program_id(1)
    cols = pid_k * BK + tl.arange(0, BK)
    ranks = tl.arange(0, BR)
    nkb = tl.cdiv(K, BK)
    acc = tl.zeros((BR, BK), dtype=tl.float32)
    t0 = pid_s * t_per_split
    for t in range(t0, tl.minimum(t0 + t_per_split, T), BT):
        rows = t + tl.arange(0, BT)
        inside = (rows[:, None] < T) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=inside, other=0.0)
        x = tl.where(_unpack(bits_ptr, rows, pid_k, T, nkb, BT, BK), x, tl.zeros_like(x))
        g = tl.load(gh_ptr + rows[None, :] * R + ranks[:, None], mask=(rows[None, :] < T) & (ranks[:, None] < R),
                    other=0.0)  # (BR, BT) = gh^T tile
        acc += tl.dot(g, x)
    acc *= scale
    tl.atomic_add(out_ptr + ranks[:, None] * K + cols[None, :], acc, mask=(ranks[:, None] < R) & (cols[None, :] < K))


@triton.jit(do_not_specialize=["T"])
def grad_x_kernel(gx_ptr, gh_ptr, a_ptr, bits_ptr, T, K, R, scale, stride_gx, stride_a,
                  BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    """grad_x += ((gh @ A) * keep * scale), in place."""
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_k * BK + tl.arange(0, BK)
    ranks = tl.arange(0, BR)
    g = tl.load(gh_ptr + rows[:, None] * R + ranks[None, :], mask=(rows[:, None] < T) & (ranks[None, :] < R), other=0.0)
    a = tl.load(a_ptr + ranks[:, None] * stride_a + cols[None, :], mask=(ranks[:, None] < R) & (cols[None, :] < K),
                other=0.0)
    lora = tl.dot(g, a) * scale  # (BM, BK)
    lora = tl.where(_unpack(bits_ptr, rows, pid_k, T, tl.cdiv(K, BK), BM, BK), lora, 0.0)
    inside = (rows[:, None] < T) & (cols[None, :] < K)
    ptrs = gx_ptr + rows[:, None] * stride_gx + cols[None, :]
    gx = tl.load(ptrs, mask=inside, other=0.0)
    tl.store(ptrs, (gx.to(tl.float32) + lora).to(gx.dtype), mask=inside)


@triton.jit(do_not_specialize=["T", "seed"])
def mask_kernel(out_ptr, T, K, seed, thr, BM: tl.constexpr, BK: tl.constexpr):
    """The keep mask as int8 (T x K), drawn as the forward draws it (for tests)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    keep, _ = _draw(seed, rows, tl.program_id(1), tl.cdiv(K, BK), thr, BM, BK)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8), mask=(rows[:, None] < T) & (cols[None, :] < K))
