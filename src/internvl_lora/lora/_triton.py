"""The Triton source of `internvl_lora.lora.kernels` (imported only when the kernels are used: it needs triton).

The keep-mask: columns go in blocks of 8G; in block kb, element (row, kb*8G + j*G + g) is kept when the
j-th 16-bit half of Philox(seed, (row * blocks + kb) * G + g), ROUNDS rounds, is >= thr. One Philox call thus
serves eight elements, and every kernel reads a block as eight (rows x G) parts, one per half -- no reshuffling.
"""

import triton
import triton.language as tl


@triton.jit
def _halves(seed, off, ROUNDS: tl.constexpr):
    r0, r1, r2, r3 = tl.randint4x(seed, off, ROUNDS)
    return (r0 & 0xFFFF, r0 >> 16, r1 & 0xFFFF, r1 >> 16, r2 & 0xFFFF, r2 >> 16, r3 & 0xFFFF, r3 >> 16)


@triton.jit
def _fwd_part(acc, x_ptr, a_ptr, rows, row_ok, cols, K, stride_x, stride_a, ranks, R, half, thr):
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < K),
                other=0.0)
    x = x * (half >= thr).to(x.dtype)  # (a select on the 1-bit mask would pass it through shared memory)
    a = tl.load(a_ptr + ranks[None, :] * stride_a + cols[:, None], mask=(cols[:, None] < K) & (ranks[None, :] < R),
                other=0.0)  # (G, BR): a tile of A^T, read from A where it is (no transposed copy)
    return tl.dot(x, a, acc)


# Integers that change with a micro-batch's token count (T and what is derived from it) are not specialised:
# Triton would compile a kernel again whenever one of them is 1 or a multiple of 16 for the first time, a
# stall of a training step in the middle of a run.
@triton.jit(do_not_specialize=["T", "seed", "blocks_per_split"])
def forward_kernel(x_ptr, a_ptr, out_ptr, T, K, R, seed, thr, scale, stride_x, stride_a, blocks_per_split,
                   BM: tl.constexpr, G: tl.constexpr, BR: tl.constexpr, SPLIT: tl.constexpr, ROUNDS: tl.constexpr):
    """out[rows] (+)= scale * (x * keep) @ A^T over this program's column blocks; float32 (T x R).
    A is (R x K) with unit column stride."""
    pid_m, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < T
    g = tl.arange(0, G)
    ranks = tl.arange(0, BR)
    nkb = tl.cdiv(K, 8 * G)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for kb in range(pid_s * blocks_per_split, tl.minimum(pid_s * blocks_per_split + blocks_per_split, nkb)):
        h0, h1, h2, h3, h4, h5, h6, h7 = _halves(seed, (rows[:, None] * nkb + kb) * G + g[None, :], ROUNDS)
        c = kb * 8 * G + g
        acc = _fwd_part(acc, x_ptr, a_ptr, rows, row_ok, c, K, stride_x, stride_a, ranks, R, h0, thr)
        acc = _fwd_part(acc, x_ptr, a_ptr, rows, row_ok, c + G, K, stride_x, stride_a, ranks, R, h1, thr)
        acc = _fwd_part(acc, x_ptr, a_ptr, rows, row_ok, c + 2 * G, K, stride_x, stride_a, ranks, R, h2, thr)
        acc = _fwd_part(acc, x_ptr, a_ptr, rows, row_ok, c + 3 * G, K, stride_x, stride_a, ranks, R, h3, thr)
        acc = _fwd_part(acc, x_ptr, a_ptr, rows, row_ok, c + 4 * G, K, stride_x, stride_a, ranks, R, h4, thr)
        acc = _fwd_part(acc, x_ptr, a_ptr, rows, row_ok, c + 5 * G, K, stride_x, stride_a, ranks, R, h5, thr)
        acc = _fwd_part(acc, x_ptr, a_ptr, rows, row_ok, c + 6 * G, K, stride_x, stride_a, ranks, R, h6, thr)
        acc = _fwd_part(acc, x_ptr, a_ptr, rows, row_ok, c + 7 * G, K, stride_x, stride_a, ranks, R, h7, thr)
    acc *= scale
    ptrs = out_ptr + rows[:, None] * R + ranks[None, :]
    ok = row_ok[:, None] & (ranks[None, :] < R)
    if SPLIT:
        tl.atomic_add(ptrs, acc, mask=ok)
    else:
        tl.store(ptrs, acc, mask=ok)


@triton.jit
def _grad_a_part(acc, gh_t, x_ptr, u_ptr, rows, row_ok, cols, K, stride_x, half, thr, SWIGLU: tl.constexpr):
    ok = row_ok[:, None] & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
    if SWIGLU:  # x is the gate: the input is silu(gate) * up, formed as swiglu_forward_kernel forms it
        u = tl.load(u_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
        g = x.to(tl.float32)
        x = (g * tl.sigmoid(g)).to(u.dtype) * u
    x = x * (half >= thr).to(x.dtype)  # (a select on the 1-bit mask would pass it through shared memory)
    return tl.dot(gh_t, x, acc)


@triton.jit
def _grad_a_store(out_ptr, acc, ranks, R, cols, K, scale, SPLIT: tl.constexpr):
    ptrs = out_ptr + ranks[:, None] * K + cols[None, :]
    ok = (ranks[:, None] < R) & (cols[None, :] < K)
    if SPLIT:
        tl.atomic_add(ptrs, acc * scale, mask=ok)
    else:
        tl.store(ptrs, acc * scale, mask=ok)


@triton.jit(do_not_specialize=["T", "seed", "rows_per_split"])
def grad_a_kernel(gh_ptr, x_ptr, u_ptr, out_ptr, T, K, R, seed, thr, scale, stride_x, stride_gh, rows_per_split,
                  BT: tl.constexpr, G: tl.constexpr, BR: tl.constexpr, SPLIT: tl.constexpr, SWIGLU: tl.constexpr,
                  ROUNDS: tl.constexpr):
    """out[:, block] (+)= scale * gh^T @ (x * keep) over this program's rows; float32 (R x K). With SWIGLU,
    x = silu(gate) * up from x_ptr (the gate) and u_ptr (up, the same strides), never written out."""
    kb, pid_s = tl.program_id(0), tl.program_id(1)
    nkb = tl.cdiv(K, 8 * G)
    g = tl.arange(0, G)
    ranks = tl.arange(0, BR)
    a0 = tl.zeros((BR, G), dtype=tl.float32)
    a1 = tl.zeros((BR, G), dtype=tl.float32)
    a2 = tl.zeros((BR, G), dtype=tl.float32)
    a3 = tl.zeros((BR, G), dtype=tl.float32)
    a4 = tl.zeros((BR, G), dtype=tl.float32)
    a5 = tl.zeros((BR, G), dtype=tl.float32)
    a6 = tl.zeros((BR, G), dtype=tl.float32)
    a7 = tl.zeros((BR, G), dtype=tl.float32)
    c = kb * 8 * G + g
    t_end = tl.minimum(pid_s * rows_per_split + rows_per_split, T)
    for t0 in range(pid_s * rows_per_split, t_end, BT):
        rows = t0 + tl.arange(0, BT)
        row_ok = rows < t_end
        gh_t = tl.load(gh_ptr + rows[None, :] * stride_gh + ranks[:, None], mask=(ranks[:, None] < R) & row_ok[None, :],
                       other=0.0)  # (BR, BT): a tile of gh^T, read from the (T x R) gh (no transposed copy)
        h0, h1, h2, h3, h4, h5, h6, h7 = _halves(seed, (rows[:, None] * nkb + kb) * G + g[None, :], ROUNDS)
        a0 = _grad_a_part(a0, gh_t, x_ptr, u_ptr, rows, row_ok, c, K, stride_x, h0, thr, SWIGLU)
        a1 = _grad_a_part(a1, gh_t, x_ptr, u_ptr, rows, row_ok, c + G, K, stride_x, h1, thr, SWIGLU)
        a2 = _grad_a_part(a2, gh_t, x_ptr, u_ptr, rows, row_ok, c + 2 * G, K, stride_x, h2, thr, SWIGLU)
        a3 = _grad_a_part(a3, gh_t, x_ptr, u_ptr, rows, row_ok, c + 3 * G, K, stride_x, h3, thr, SWIGLU)
        a4 = _grad_a_part(a4, gh_t, x_ptr, u_ptr, rows, row_ok, c + 4 * G, K, stride_x, h4, thr, SWIGLU)
        a5 = _grad_a_part(a5, gh_t, x_ptr, u_ptr, rows, row_ok, c + 5 * G, K, stride_x, h5, thr, SWIGLU)
        a6 = _grad_a_part(a6, gh_t, x_ptr, u_ptr, rows, row_ok, c + 6 * G, K, stride_x, h6, thr, SWIGLU)
        a7 = _grad_a_part(a7, gh_t, x_ptr, u_ptr, rows, row_ok, c + 7 * G, K, stride_x, h7, thr, SWIGLU)
    _grad_a_store(out_ptr, a0, ranks, R, c, K, scale, SPLIT)
    _grad_a_store(out_ptr, a1, ranks, R, c + G, K, scale, SPLIT)
    _grad_a_store(out_ptr, a2, ranks, R, c + 2 * G, K, scale, SPLIT)
    _grad_a_store(out_ptr, a3, ranks, R, c + 3 * G, K, scale, SPLIT)
    _grad_a_store(out_ptr, a4, ranks, R, c + 4 * G, K, scale, SPLIT)
    _grad_a_store(out_ptr, a5, ranks, R, c + 5 * G, K, scale, SPLIT)
    _grad_a_store(out_ptr, a6, ranks, R, c + 6 * G, K, scale, SPLIT)
    _grad_a_store(out_ptr, a7, ranks, R, c + 7 * G, K, scale, SPLIT)


@triton.jit
def _grad_x_part(out_ptr, gh, a_ptr, rows, row_ok, cols, K, stride_out, stride_a, ranks, R, half, thr, scale):
    a = tl.load(a_ptr + ranks[:, None] * stride_a + cols[None, :], mask=(ranks[:, None] < R) & (cols[None, :] < K),
                other=0.0)  # (BR, G)
    v = tl.dot(gh, a) * scale
    v = v * (half >= thr).to(v.dtype)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], v.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols[None, :] < K))


@triton.jit(do_not_specialize=["T", "seed"])
def grad_x_kernel(out_ptr, gh_ptr, a_ptr, T, K, R, seed, thr, scale, stride_out, stride_a, stride_gh,
                  BM: tl.constexpr, G: tl.constexpr, BR: tl.constexpr, ROUNDS: tl.constexpr):
    """out[rows, block] = scale * (gh @ A) * keep (written, not added)."""
    pid_m, kb = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < T
    g = tl.arange(0, G)
    ranks = tl.arange(0, BR)
    nkb = tl.cdiv(K, 8 * G)
    gh = tl.load(gh_ptr + rows[:, None] * stride_gh + ranks[None, :], mask=row_ok[:, None] & (ranks[None, :] < R),
                 other=0.0)
    h0, h1, h2, h3, h4, h5, h6, h7 = _halves(seed, (rows[:, None] * nkb + kb) * G + g[None, :], ROUNDS)
    c = kb * 8 * G + g
    _grad_x_part(out_ptr, gh, a_ptr, rows, row_ok, c, K, stride_out, stride_a, ranks, R, h0, thr, scale)
    _grad_x_part(out_ptr, gh, a_ptr, rows, row_ok, c + G, K, stride_out, stride_a, ranks, R, h1, thr, scale)
    _grad_x_part(out_ptr, gh, a_ptr, rows, row_ok, c + 2 * G, K, stride_out, stride_a, ranks, R, h2, thr, scale)
    _grad_x_part(out_ptr, gh, a_ptr, rows, row_ok, c + 3 * G, K, stride_out, stride_a, ranks, R, h3, thr, scale)
    _grad_x_part(out_ptr, gh, a_ptr, rows, row_ok, c + 4 * G, K, stride_out, stride_a, ranks, R, h4, thr, scale)
    _grad_x_part(out_ptr, gh, a_ptr, rows, row_ok, c + 5 * G, K, stride_out, stride_a, ranks, R, h5, thr, scale)
    _grad_x_part(out_ptr, gh, a_ptr, rows, row_ok, c + 6 * G, K, stride_out, stride_a, ranks, R, h6, thr, scale)
    _grad_x_part(out_ptr, gh, a_ptr, rows, row_ok, c + 7 * G, K, stride_out, stride_a, ranks, R, h7, thr, scale)


@triton.jit
def _mask_part(out_ptr, rows, row_ok, cols, K, half, thr):
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], (half >= thr).to(tl.int8),
             mask=row_ok[:, None] & (cols[None, :] < K))


@triton.jit(do_not_specialize=["T", "seed"])
def mask_kernel(out_ptr, T, K, seed, thr, BM: tl.constexpr, G: tl.constexpr, ROUNDS: tl.constexpr):
    """The keep-mask itself (int8), for tests."""
    pid_m, kb = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < T
    g = tl.arange(0, G)
    nkb = tl.cdiv(K, 8 * G)
    h0, h1, h2, h3, h4, h5, h6, h7 = _halves(seed, (rows[:, None] * nkb + kb) * G + g[None, :], ROUNDS)
    c = kb * 8 * G + g
    _mask_part(out_ptr, rows, row_ok, c, K, h0, thr)
    _mask_part(out_ptr, rows, row_ok, c + G, K, h1, thr)
    _mask_part(out_ptr, rows, row_ok, c + 2 * G, K, h2, thr)
    _mask_part(out_ptr, rows, row_ok, c + 3 * G, K, h3, thr)
    _mask_part(out_ptr, rows, row_ok, c + 4 * G, K, h4, thr)
    _mask_part(out_ptr, rows, row_ok, c + 5 * G, K, h5, thr)
    _mask_part(out_ptr, rows, row_ok, c + 6 * G, K, h6, thr)
    _mask_part(out_ptr, rows, row_ok, c + 7 * G, K, h7, thr)


@triton.jit
def swiglu_forward_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = silu(g) * u, the SiLU in float32 rounded to the inputs' dtype before the product."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    g = tl.load(g_ptr + i, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i, mask=ok, other=0.0)
    tl.store(out_ptr + i, (g * tl.sigmoid(g)).to(u.dtype) * u, mask=ok)


@triton.jit
def swiglu_backward_kernel(d_ptr, g_ptr, u_ptr, n, BLOCK: tl.constexpr):
    """With d the gradient of silu(g) * u: g <- d * u * silu'(g), u <- d * silu(g), in place."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    d = tl.load(d_ptr + i, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + i, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(u_ptr + i, (d * silu).to(u_ptr.dtype.element_ty), mask=ok)
    tl.store(g_ptr + i, (d * u * (silu * (1 - sig) + sig)).to(g_ptr.dtype.element_ty), mask=ok)
