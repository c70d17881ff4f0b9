"""The Triton kernels (internvl_lora.lora.kernels): the LoRA-dropout kernels against the formula with their
own mask, the SwiGLU kernels against torch, and the fused LoRA layer and MLP on that path (GPU only); a kernel
that fails to compile is reported as a user error (any machine)."""

from __future__ import annotations

import pytest
import torch

from internvl_lora.lora import kernels

needs_gpu = pytest.mark.skipif(not kernels.available(), reason="needs triton and a CUDA device")


def close(x, ref, frac=1e-2):
    """Equal up to `frac` of the reference's largest magnitude (bf16 rounding of large partial sums)."""
    return (x.float() - ref.float()).abs().max().item() <= frac * ref.float().abs().max().item()


@pytest.mark.gpu
@needs_gpu
def test_keep_mask_is_bernoulli_per_element_and_seeded():
    m = kernels.dropout_keep_mask(1000, 3584, 1234, 0.05, "cuda")
    assert m.shape == (1000, 3584) and m.dtype == torch.bool
    assert 0.948 < m.float().mean().item() < 0.952
    assert torch.equal(m, kernels.dropout_keep_mask(1000, 3584, 1234, 0.05, "cuda"))
    assert not torch.equal(m, kernels.dropout_keep_mask(1000, 3584, 1235, 0.05, "cuda"))
    # neighbours (in a row, in a column, eight columns apart: the halves of one Philox call) are
    # independent: P(both kept) ~ (1 - p)^2
    # and so are the masks of two adjacent seeds
    other = kernels.dropout_keep_mask(1000, 3584, 1235, 0.05, "cuda")
    for a, b in ((m[:, :-1], m[:, 1:]), (m[:-1], m[1:]), (m[:, :-8], m[:, 8:]), (m[:, :-kernels.G], m[:, kernels.G:]),
                 (m, other)):
        assert abs((a & b).float().mean().item() - 0.95**2) < 0.002
    # each of the eight 16-bit halves of a Philox draw keeps at the rate asked (3584 = 14 blocks of 8 G columns)
    per_half = m.view(1000, -1, 8, kernels.G).float().mean(dim=(0, 1, 3))
    assert ((per_half - 0.95).abs() < 0.002).all(), per_half  # (6 standard errors)


@pytest.mark.gpu
@needs_gpu
def test_kernels_read_a_and_gh_in_place_with_their_row_strides():
    """A and gh are read where they are (any row stride, adjacent columns): no transposed or contiguous
    copy is made per call, and the results equal those on contiguous copies."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    bf, p, seed, t, k, r = torch.bfloat16, 0.05, 7, 1000, 3584, 16
    x = torch.randn(t, k, device="cuda", dtype=bf)
    a = (torch.randn(r, k + 64, device="cuda", dtype=bf) / 10)[:, 32:32 + k]  # rows k + 64 apart
    gh = torch.randn(t, r + 8, device="cuda", dtype=bf)[:, 4:4 + r]
    assert not a.is_contiguous() and not gh.is_contiguous()
    with Ops() as ops:
        got = (kernels.lora_a_forward(x, a, seed, p, 2.0), kernels.lora_a_grad(gh, x, seed, p),
               kernels.lora_input_grad(gh, a, seed, p))
    copies = [n for n in ops.names if n.split(".")[0] in ("clone", "copy_", "_to_copy", "contiguous")]
    assert not copies, copies
    want = (kernels.lora_a_forward(x, a.contiguous(), seed, p, 2.0), kernels.lora_a_grad(gh.contiguous(), x, seed, p),
            kernels.lora_input_grad(gh.contiguous(), a.contiguous(), seed, p))
    for g, w in zip(got, want):
        assert close(g, w, 1e-5)  # (float32 partial sums added atomically: their order may differ)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("t,k,r", [(1000, 3584, 16), (77, 300, 8), (3840, 18944, 16), (5, 64, 32), (2000, 512, 16)])
def test_kernels_equal_the_formula_with_their_mask(t, k, r):
    torch.manual_seed(0)
    bf, p, seed = torch.bfloat16, 0.1, 99
    x = torch.randn(t, k, device="cuda", dtype=bf)
    a = torch.randn(r, k, device="cuda", dtype=bf) / 10
    gh = torch.randn(t, r, device="cuda", dtype=bf)
    keep = kernels.dropout_keep_mask(t, k, seed, p, "cuda")
    dropped = x.float() * keep * kernels.keep_scale(p)
    assert close(kernels.lora_a_forward(x, a, seed, p, 2.0), 2.0 * dropped @ a.float().t(), 1e-3)
    assert close(kernels.lora_a_grad(gh, x, seed, p), gh.float().t() @ dropped, 1e-3)
    assert close(kernels.lora_input_grad(gh, a, seed, p), (gh.float() @ a.float()) * keep * kernels.keep_scale(p))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("t,k", [(1000, 18944), (77, 300), (4999, 4864)])
def test_grad_a_forming_the_swiglu_itself_equals_it_on_the_written_product(t, k):
    """The fused MLP's down projection: A's gradient with silu(gate) * up formed inside the kernel equals
    the kernel on the written-out product (the same rounding: the formula of swiglu_forward)."""
    torch.manual_seed(0)
    g = torch.randn(t, k, device="cuda", dtype=torch.bfloat16) * 3
    u = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
    gh = torch.randn(t, 16, device="cuda", dtype=torch.bfloat16)
    x = kernels.swiglu_forward(g, u)
    want = kernels.lora_a_grad(gh, x, 5, 0.05)
    got = kernels.lora_a_grad(gh, g, 5, 0.05, up=u)
    assert close(got, want, 1e-5)  # (float32 partial sums added atomically: their order may differ)
    with pytest.raises(ValueError):
        kernels.lora_a_grad(gh, g, 5, 0.05, up=u[:, :-1])


@pytest.mark.gpu
@needs_gpu
def test_swiglu_kernels_equal_torch():
    torch.manual_seed(0)
    g = torch.randn(700, 1000, device="cuda", dtype=torch.bfloat16) * 3
    u = torch.randn(700, 1000, device="cuda", dtype=torch.bfloat16)
    d = torch.randn(700, 1000, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(kernels.swiglu_forward(g, u), torch.nn.functional.silu(g) * u)
    gg, uu = g.clone().requires_grad_(True), u.clone().requires_grad_(True)
    (torch.nn.functional.silu(gg.float()) * uu.float()).backward(d.float())
    grad_g, grad_u = kernels.swiglu_backward_(d, g.clone(), u.clone())
    assert close(grad_g, gg.grad) and close(grad_u, uu.grad)


@pytest.mark.gpu
@needs_gpu
def test_fused_lora_layer_on_the_kernel_path_equals_the_formula(monkeypatch, cuda_lora_inputs):
    """_LoraLinear with dropout on a GPU: output and all gradients equal the explicit formula with the
    kernels' mask for the seed the layer drew (forward and backward use one mask)."""
    from internvl_lora.lora.fused import _LoraLinear

    monkeypatch.setattr(kernels, "new_seed", lambda: 4321)
    bf = torch.bfloat16
    x, base, bias, a, b, g = cuda_lora_inputs
    y = _LoraLinear.apply(x, base, bias, a, b, 2.0, 0.1, bf, True)
    y.backward(g)
    keep = kernels.dropout_keep_mask(3000, 512, 4321, 0.1, "cuda")
    # the reference follows the layer's dtypes: bf16 operands, float32 accumulation, bf16 products
    x2, g2 = x.detach().reshape(-1, 512).float(), g.reshape(-1, 256)
    a16, b16 = a.detach().to(bf), b.detach().to(bf)
    dropped = x2 * keep * kernels.keep_scale(0.1)
    h = (dropped @ a16.float().t() * 2.0).to(bf)
    ref = torch.nn.functional.linear(x.detach().reshape(-1, 512), base, bias).float() + h.float() @ b16.float().t()
    assert close(y.reshape(-1, 256), ref)
    gh = (g2 @ b16) * 2.0
    gx = (g2 @ base).float() + (gh.float() @ a16.float()) * keep * kernels.keep_scale(0.1)
    assert close(x.grad.reshape(-1, 512), gx)
    assert close(a.grad, gh.float().t() @ dropped, 1e-3)
    assert close(b.grad, g2.float().t() @ h.float())
    assert 0.88 < keep.float().mean().item() < 0.92


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("use_kernels", [False, True])
def test_fused_mlp_on_the_gpu_equals_separate_layers(use_kernels):
    """bf16 on the GPU, both dropout paths: the fused MLP node (product formed again in the backward,
    the same mask redrawn) equals the SwiGLU and the down layer as separate nodes, drawn from the same
    generator states."""
    from internvl_lora.lora.fused import _LoraLinear, _SwiGLULoraLinear

    torch.manual_seed(0)
    bf = torch.bfloat16
    gate = torch.randn(2, 600, 384, device="cuda", dtype=bf, requires_grad=True)
    up = torch.randn(2, 600, 384, device="cuda", dtype=bf, requires_grad=True)
    w = torch.randn(128, 384, device="cuda", dtype=bf) / 20
    a = torch.randn(16, 384, device="cuda", requires_grad=True)
    b = torch.randn(128, 16, device="cuda", requires_grad=True)
    g = torch.randn(2, 600, 128, device="cuda", dtype=bf)
    results = []
    for fused in (False, True):
        for t in (gate, up, a, b):
            t.grad = None
        torch.manual_seed(5)
        torch.cuda.manual_seed(5)
        if fused:
            y = _SwiGLULoraLinear.apply(gate, up, w, None, a, b, 2.0, 0.1, bf, use_kernels)
        else:
            y = _LoraLinear.apply(torch.nn.functional.silu(gate) * up, w, None, a, b, 2.0, 0.1, bf, use_kernels)
        y.backward(g)
        results.append([y.detach()] + [t.grad.clone() for t in (gate, up, a, b)])
    for r0, r1 in zip(*results):
        assert close(r1, r0), (r0.float().abs().max(), (r1.float() - r0.float()).abs().max())


def test_a_failing_triton_kernel_names_the_way_around_it(monkeypatch):
    """A triton version that cannot compile a kernel (triton 3.6 failed on a select over a 1-bit mask)
    is reported as a user error naming the switch that avoids the kernels."""
    from internvl_lora.errors import UserError

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                raise RuntimeError("PassManager::run failed")
            return launch

    monkeypatch.setattr(kernels, "_kernels", lambda: type("K", (), {"swiglu_forward_kernel": Broken()})())
    with pytest.raises(UserError) as e:
        kernels.swiglu_forward(torch.ones(4), torch.ones(4))
    assert "swiglu_forward_kernel" in str(e.value) and "train.lora_kernels=false" in str(e.value)
    assert "PassManager::run failed" in str(e.value)
