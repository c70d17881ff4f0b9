"""Fused LoRA layers and the fused SwiGLU MLP (internvl_lora.lora.fused) against PEFT's own LoRA path: the
same outputs and gradients (dropout masks included), less kept for the backward."""

from __future__ import annotations

import pytest
import torch


def _run(model, x, seed=1):
    torch.manual_seed(seed)
    xx = x.clone().requires_grad_(True)
    y = model(xx)
    (y.square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), xx.grad.clone(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_layers_equal_peft_in_float32(dropout, peft_block):
    """Same outputs and gradients as PEFT's own LoRA path, dropout masks included (same generator draws)."""
    from internvl_lora.lora.fused import FusedLoraLinear, fuse_lora_layers

    x = torch.randn(2, 7, 24)
    ref = peft_block(dropout)
    fused = peft_block(dropout)
    assert fuse_lora_layers(fused) == 5
    assert sum(type(m) is FusedLoraLinear for m in fused.modules()) == 5
    assert list(ref.state_dict()) == list(fused.state_dict())  # parameter names unchanged (save/merge)
    y0, gx0, g0 = _run(ref, x)
    y1, gx1, g1 = _run(fused, x)
    assert torch.equal(y0, y1)
    assert torch.allclose(gx0, gx1, rtol=1e-5, atol=1e-7)
    assert g0.keys() == g1.keys() and len(g0) == 10
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-7), n
    if dropout:  # the masks really are random: a different seed gives different outputs
        y2, _, _ = _run(fused, x, seed=2)
        assert not torch.equal(y1, y2)
    fused.eval()
    ref.eval()
    with torch.no_grad():
        assert torch.equal(ref(x), fused(x))  # eval: no dropout
    import pickle

    copy = pickle.loads(pickle.dumps(fused))  # torch.save of a whole model pickles the class by name
    assert sum(type(m) is FusedLoraLinear for m in copy.modules()) == 5
    with torch.no_grad():
        assert torch.equal(copy(x), fused(x))


def _saved_bytes(model, x) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward of one forward."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x.clone().requires_grad_(True)).sum()
    return sum(seen.values())


def test_fused_lora_keeps_less_for_the_backward(peft_block):
    """PEFT keeps a dropped copy and a mask per adapted projection; the fused path keeps the shared input
    (and, on a CPU, the masks; on a GPU it redraws them, see the GPU test below)."""
    from internvl_lora.lora.fused import fuse_lora_layers

    x = torch.randn(4, 64, 24)
    ref, fused = peft_block(0.1), peft_block(0.1)
    fuse_lora_layers(fused)
    before, after = _saved_bytes(ref, x), _saved_bytes(fused, x)
    # Dropped float32 copies: 3 x (64x24) for q/k/v + 64x24 for up + 64x40 for down; the masks stay on a CPU.
    n = 4 * 64
    expected_saving = n * (4 * 24 + 40) * 4 - n * 24 * 4  # the shared input h is kept once
    assert before - after >= 0.9 * expected_saving, (before, after, expected_saving)


def _peft_mlp(dropout, seed=0, dtype=torch.float32):
    """A Qwen2 MLP (gate, up, down; SiLU) with LoRA on all three projections, B != 0."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=24, intermediate_size=56, hidden_act="silu")

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = Qwen2MLP(cfg)

        def forward(self, x):
            return self.mlp(x)

    model = get_peft_model(Wrap().to(dtype), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights="gaussian",
                                                         target_modules=["gate_proj", "up_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_swiglu_mlp_equals_peft_and_keeps_less(dropout):
    """The fused MLP (the down layer keeps gate and up, not their product) gives PEFT's outputs and
    gradients (same dropout draws, float32) and keeps one (tokens x intermediate) tensor less."""
    from internvl_lora.lora.fused import fuse_lora_layers, fuse_swiglu_mlps

    x = torch.randn(2, 9, 24)
    ref, layers_only, fused = _peft_mlp(dropout), _peft_mlp(dropout), _peft_mlp(dropout)
    for m in (layers_only, fused):
        assert fuse_lora_layers(m) == 3
    assert fuse_swiglu_mlps(fused) == 1 and fuse_swiglu_mlps(fused) == 0  # once
    assert list(ref.state_dict()) == list(fused.state_dict())
    y0, gx0, g0 = _run(ref, x)
    y1, gx1, g1 = _run(fused, x)
    assert torch.allclose(y0, y1, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gx0, gx1, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) == 6
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-6), n
    saved_layers, saved_fused = _saved_bytes(layers_only, x), _saved_bytes(fused, x)
    product = 2 * 9 * 56 * 4  # silu(gate) * up, float32
    assert saved_layers - saved_fused >= product, (saved_layers, saved_fused)
    fused.eval()
    ref.eval()
    with torch.no_grad():
        assert torch.allclose(ref(x), fused(x), rtol=1e-5, atol=1e-6)


def test_fused_swiglu_mlp_replaces_an_instance_bound_forward():
    """Liger binds its SwiGLU forward to each MLP instance; fusing replaces it (the same computation)."""
    from internvl_lora.lora.fused import fuse_lora_layers, fuse_swiglu_mlps

    model = _peft_mlp(0.0)
    mlp = model.base_model.model.mlp
    mlp.__dict__["forward"] = lambda x: (_ for _ in ()).throw(AssertionError("the bound forward ran"))
    fuse_lora_layers(model)
    assert fuse_swiglu_mlps(model) == 1 and "forward" not in mlp.__dict__
    _run(model, torch.randn(1, 5, 24))


def test_fused_lora_under_autocast_matches_peft(peft_block):
    """bfloat16 autocast with float32 adapters (the Trainer's bf16 mode): no float32 copies, same result."""
    from internvl_lora.lora.fused import fuse_lora_layers

    x = torch.randn(2, 9, 24, dtype=torch.bfloat16)
    ref, fused = peft_block(0.0, dtype=torch.bfloat16), peft_block(0.0, dtype=torch.bfloat16)
    for m in (ref, fused):  # adapters in float32 next to a bf16 base, as PEFT's autocast_adapter_dtype does
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
    fuse_lora_layers(fused)
    outs = []
    for m in (ref, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, gx, g = _run(m, x)
        outs.append((y, gx, g))
        assert all(v.dtype == torch.float32 for k, v in g.items())
    (y0, gx0, g0), (y1, gx1, g1) = outs
    assert y1.dtype == y0.dtype == torch.bfloat16
    assert torch.allclose(y0.float(), y1.float(), rtol=2e-2, atol=2e-2)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=5e-2, atol=5e-3), n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_lora_on_cuda_redraws_the_forward_mask(cuda_lora_inputs):
    """On the GPU in bf16: the backward's mask is the forward's (CUDA generator state saved and restored),
    checked against the explicit formula with the mask drawn from the same generator state."""
    from internvl_lora.lora.fused import _LoraLinear

    bf = torch.bfloat16
    x, base, bias, a, b, g = cuda_lora_inputs
    state = torch.cuda.get_rng_state()
    y = _LoraLinear.apply(x, base, bias, a, b, 2.0, 0.1, bf, False)  # torch's dropout (not the Triton kernels)
    y.backward(g)
    after = torch.cuda.get_rng_state()
    torch.cuda.set_rng_state(state)
    x2 = x.detach().reshape(-1, 512)
    dropped, mask = torch.native_dropout(x2, 0.1, True)
    assert torch.equal(torch.cuda.get_rng_state(), after)  # the backward left the generator where the forward did
    a16, b16, g2 = a.detach().to(bf), b.detach().to(bf), g.reshape(-1, 256)
    h = (dropped @ a16.t()) * 2.0
    ref = torch.nn.functional.linear(x2, base, bias) + h @ b16.t()
    assert torch.allclose(y.reshape(-1, 256).float(), ref.float(), rtol=2e-2, atol=2e-2)
    gh = (g2 @ b16) * 2.0
    gx = g2 @ base + torch.ops.aten.native_dropout_backward(gh @ a16, mask, 1 / 0.9)
    assert torch.allclose(x.grad.reshape(-1, 512).float(), gx.float(), rtol=2e-2, atol=5e-2)
    assert torch.allclose(a.grad, (gh.t() @ dropped).float(), rtol=2e-2, atol=5e-2)
    assert torch.allclose(b.grad, (g2.t() @ h).float(), rtol=2e-2, atol=5e-2)
    assert 0.85 < mask.float().mean().item() < 0.95
