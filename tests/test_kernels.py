"""The Triton LoRA-dropout kernels (internvl_lora.kernels) against the formula with their own mask, and
the fused LoRA layer on that path. GPU only."""

from __future__ import annotations

import pytest
import torch

from internvl_lora import kernels

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not kernels.available(), reason="needs triton and a CUDA device")]


def close(x, ref, frac=1e-2):
    """Equal up to `frac` of the reference's largest magnitude (bf16 rounding of large partial sums)."""
    return (x.float() - ref.float()).abs().max().item() <= frac * ref.float().abs().max().item()


def test_keep_mask_is_bernoulli_per_element_and_seeded():
    m = kernels.dropout_keep_mask(1000, 3584, 1234, 0.05, "cuda")
    assert m.shape == (1000, 3584) and m.dtype == torch.bool
    assert 0.945 < m.float().mean().item() < 0.955
    assert torch.equal(m, kernels.dropout_keep_mask(1000, 3584, 1234, 0.05, "cuda"))
    assert not torch.equal(m, kernels.dropout_keep_mask(1000, 3584, 1235, 0.05, "cuda"))
    assert not torch.equal(m[0], m[1]) and not torch.equal(m[:, 0], m[:, 1])
    # neighbouring elements are independent: P(both kept) ~ (1 - p)^2
    both = (m[:, :-1] & m[:, 1:]).float().mean().item()
    assert abs(both - 0.95**2) < 0.003


@pytest.mark.parametrize("t,k,r", [(1000, 3584, 16), (77, 300, 8), (4000, 18944, 16), (5, 64, 32)])
def test_kernels_equal_the_formula_with_their_mask(t, k, r):
    torch.manual_seed(0)
    bf, p, seed = torch.bfloat16, 0.1, 99
    x = torch.randn(t, k, device="cuda", dtype=bf)
    a = torch.randn(r, k, device="cuda", dtype=bf) / 10
    gh = torch.randn(t, r, device="cuda", dtype=bf)
    gx = torch.randn(t, k, device="cuda", dtype=bf)
    keep = kernels.dropout_keep_mask(t, k, seed, p, "cuda")
    dropped = x.float() * keep * kernels.keep_scale(p)
    h, bits = kernels.lora_a_forward(x, a, seed, p)
    assert torch.equal(kernels.unpack_keep_bits(bits, k), keep)  # the forward keeps the mask it drew
    assert close(h, dropped @ a.float().t(), 1e-3)
    assert close(kernels.lora_a_grad(gh, x, bits, p), gh.float().t() @ dropped, 1e-3)
    ref = gx.float() + (gh.float() @ a.float()) * keep * kernels.keep_scale(p)
    assert close(kernels.add_lora_input_grad_(gx.clone(), gh, a, bits, p), ref)


def test_fused_lora_layer_on_the_triton_path_equals_the_formula(monkeypatch):
    """_LoraLinear with dropout on a GPU: output and all gradients equal the explicit formula with the
    kernels' mask for the seed the layer drew (forward and backward use one mask)."""
    from internvl_lora.fast import _LoraLinear

    monkeypatch.setattr(kernels, "new_seed", lambda: 4321)
    torch.manual_seed(0)
    bf = torch.bfloat16
    x = torch.randn(3, 1000, 512, device="cuda", dtype=bf, requires_grad=True)
    base = torch.randn(256, 512, device="cuda", dtype=bf) / 20
    bias = torch.randn(256, device="cuda", dtype=bf)
    a = torch.randn(16, 512, device="cuda", dtype=torch.float32, requires_grad=True)
    b = torch.randn(256, 16, device="cuda", dtype=torch.float32, requires_grad=True)
    g = torch.randn(3, 1000, 256, device="cuda", dtype=bf)
    y = _LoraLinear.apply(x, base, bias, a, b, 2.0, 0.1, bf)
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
