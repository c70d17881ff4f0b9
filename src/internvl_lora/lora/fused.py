"""Fused LoRA layers: PEFT's LoRA `Linear` with a training forward that runs as one autograd node.

- `fuse_lora_layers` gives PEFT's LoRA layers a training forward that runs as one autograd node and
  keeps only the layer input (`FusedLoraLinear`, the node `_LoraLinear`); the dropout mask is drawn
  again in the backward (torch's generator state, or a seed for the Triton kernels of
  `internvl_lora.lora.kernels` on a GPU).
- `fuse_swiglu_mlps` makes the down projection of a gated (SwiGLU) MLP keep gate and up instead of
  their product (`_SwiGLULoraLinear`).

Generic: nothing here is specific to InternVL; PEFT, transformers and the kernels are imported on first use.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F



def _rng_state(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _with_rng_state(device: torch.device, state, fn):
    """fn() drawing random numbers from `state`; the generator's current state is restored afterwards."""
    if device.type == "cuda":
        now = torch.cuda.get_rng_state(device)
        torch.cuda.set_rng_state(state, device)
        try:
            return fn()
        finally:
            torch.cuda.set_rng_state(now, device)
    now = torch.get_rng_state()
    torch.set_rng_state(state)
    try:
        return fn()
    finally:
        torch.set_rng_state(now)


def _kernels_for(x2: torch.Tensor, a: torch.Tensor, p: float, use_kernels: bool):
    """`internvl_lora.lora.kernels` when they take this layer (dropout on, CUDA, 16-bit, triton), else None."""
    if not use_kernels or p <= 0 or not x2.is_cuda or torch.cuda.is_current_stream_capturing():
        return None
    from . import kernels

    return kernels if kernels.supported(x2, a) else None


def _lora_forward(x2, w, bias, a, b, scale: float, p: float, use_kernels: bool):
    """y = x2 W^T + bias + scale * (dropout(x2) A^T) B^T for a 2-D input, all in one dtype.

    Returns y, h = scale * dropout(x2) A^T (tokens x r), and how to draw the same dropout mask again in
    the backward: (generator state, kept mask, kernel seed) -- one of them set when p > 0.
    With `internvl_lora.lora.kernels` (a GPU): the mask is a function of a seed, drawn inside the kernel that
    forms h, and the LoRA output is written first so the large matmul adds the base product onto it in
    its epilogue. Otherwise torch's dropout: on a GPU the generator state is kept and the mask drawn again
    in the backward (drawing is cheap there); on a CPU the mask is kept (1 byte per element).
    """
    k = _kernels_for(x2, a, p, use_kernels)
    if k is not None:
        seed = k.new_seed()
        h = k.lora_a_forward(x2, a, seed, p, scale).to(x2.dtype)
        y = h @ b.t() if bias is None else torch.addmm(bias, h, b.t())
        y.addmm_(x2, w.t())
        return y, h, (None, None, seed)
    state = mask = None
    if p > 0:
        if x2.is_cuda and not torch.cuda.is_current_stream_capturing():  # (a CUDA graph keeps the mask)
            state = _rng_state(x2.device)
        dropped, mask = torch.native_dropout(x2, p, True)
    else:
        dropped = x2
    y = F.linear(x2, w, bias)
    h = (dropped @ a.t()).mul_(scale)
    y.addmm_(h, b.t())
    return y, h, (state, mask if state is None else None, None)


def _lora_backward(x2, w, a, b, h, g, rng, scale: float, p: float, needs, up=None):
    """Gradients (x2, A, B) of `_lora_forward` for the output gradient g (2-D, the compute dtype), in the
    compute dtype; `needs` says which are wanted. With `up` (the kernels' path only), x2 is a SwiGLU's gate
    and the layer input was `_swiglu(x2, up)`: the kernel forms it again itself."""
    state, mask, seed = rng
    grad_x = grad_a = grad_b = None
    gh = g @ b  # gradient of h / scale
    if needs[2]:
        grad_b = g.t() @ h
    gh = gh.mul_(scale)
    if seed is not None:
        from . import kernels

        if needs[1]:
            grad_a = kernels.lora_a_grad(gh, x2, seed, p, up=up)
        if needs[0]:
            grad_x = kernels.lora_input_grad(gh, a, seed, p)  # (gh A) * mask / (1 - p), then + g W inside the matmul
            grad_x.addmm_(g, w)
        return grad_x, grad_a, grad_b
    if state is not None:
        dropped, mask = _with_rng_state(x2.device, state, lambda: torch.native_dropout(x2, p, True))
    elif mask is not None:
        dropped = torch.ops.aten.native_dropout_backward(x2, mask, 1.0 / (1.0 - p))  # x * mask / (1 - p)
    else:
        dropped = x2
    if needs[1]:
        grad_a = gh.t() @ dropped
    if needs[0]:
        grad_x = g @ w
        if mask is None:
            grad_x.addmm_(gh, a)
        else:
            grad_x.addcmul_(gh @ a, mask, value=1.0 / (1.0 - p))  # one pass: + (gh A) * mask / (1 - p)
    return grad_x, grad_a, grad_b


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + s * (dropout(x) A^T) B^T for a frozen W, b, as one autograd node.

    Computed in `dtype` (the autocast dtype in mixed precision; the adapters' float32 weights are cast
    for the products, their gradients are returned in float32). Keeps for the backward: x (the tensor
    the layer received, so the q/k/v and gate/up layers of one decoder layer all keep the same tensor),
    the rank-r product (tokens x r) and the cast adapter weights -- never a dropped copy of x; the dropout
    mask is drawn again in the backward (see `_lora_forward`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, p: float, dtype, use_kernels: bool = True):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        w = weight.to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        y, h, rng = _lora_forward(x2, w, None if bias is None else bias.to(dtype), a, b, scale, p, use_kernels)
        ctx.p, ctx.scale, ctx.rng = p, scale, rng[:1] + (None,) + rng[2:]
        ctx.x_dtype, ctx.a_dtype, ctx.b_dtype = x.dtype, lora_a.dtype, lora_b.dtype
        ctx.save_for_backward(x2, w, a, b, h, rng[1])
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, w, a, b, h, mask = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
        rng = (ctx.rng[0], mask, ctx.rng[2])
        grad_x, grad_a, grad_b = _lora_backward(x2, w, a, b, h, g, rng, ctx.scale, ctx.p,
                                                (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]))
        if grad_x is not None:
            grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[-1]).to(ctx.x_dtype)
        return (grad_x, None, None, None if grad_a is None else grad_a.to(ctx.a_dtype),
                None if grad_b is None else grad_b.to(ctx.b_dtype), None, None, None, None)


def _swiglu(gate: torch.Tensor, up: torch.Tensor, use_kernels: bool = True) -> torch.Tensor:
    """silu(gate) * up (the SiLU in float32, rounded to the inputs' dtype before the product, as Liger
    and transformers' bfloat16 models compute it); one Triton kernel on a GPU with `use_kernels`."""
    if use_kernels and gate.is_cuda and gate.dtype in (torch.bfloat16, torch.float16):
        from . import kernels

        if kernels.available():
            return kernels.swiglu_forward(gate, up)
    return F.silu(gate) * up


def _swiglu_backward_(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, use_kernels: bool = True):
    """Gradients of `_swiglu` for the output gradient `grad`, written into `gate` and `up` (contiguous;
    not needed afterwards); returns them."""
    if use_kernels and gate.is_cuda and gate.dtype in (torch.bfloat16, torch.float16) and gate.is_contiguous() \
            and up.is_contiguous():
        from . import kernels

        if kernels.available():
            return kernels.swiglu_backward_(grad, gate, up)
    sig = torch.sigmoid(gate.float())
    silu = gate.float() * sig
    grad_up = grad.float() * silu
    grad_gate = grad.float() * up.float() * sig * (1 + gate.float() * (1 - sig))
    gate.copy_(grad_gate)
    up.copy_(grad_up)
    return gate, up


class _SwiGLULoraLinear(torch.autograd.Function):
    """down(silu(gate) * up) for a fused LoRA `down` layer, as one autograd node that keeps gate and up
    (which the SwiGLU's own backward needs anyway) but not their product: the product -- the down
    layer's input, as large as each of them -- is formed again in the backward. One (tokens x
    intermediate) tensor less per decoder layer than the SwiGLU and the down layer as separate nodes.
    Dropout of the down layer's input as in `_LoraLinear` (the same mask in the backward: the product is
    formed again exactly -- with the Triton kernels inside the kernel for A's gradient, not written out)."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, lora_a, lora_b, scale: float, p: float, dtype, use_kernels: bool = True):
        shape = gate.shape
        g2, u2 = gate.reshape(-1, shape[-1]).to(dtype), up.reshape(-1, shape[-1]).to(dtype)
        w = weight.to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        x2 = _swiglu(g2, u2, use_kernels)
        y, h, rng = _lora_forward(x2, w, None if bias is None else bias.to(dtype), a, b, scale, p, use_kernels)
        del x2
        ctx.p, ctx.scale, ctx.rng, ctx.use_kernels = p, scale, rng[:1] + (None,) + rng[2:], use_kernels
        ctx.in_dtypes, ctx.a_dtype, ctx.b_dtype = (gate.dtype, up.dtype), lora_a.dtype, lora_b.dtype
        ctx.save_for_backward(g2, u2, w, a, b, h, rng[1])
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        g2, u2, w, a, b, h, mask = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
        rng = (ctx.rng[0], mask, ctx.rng[2])
        if rng[2] is not None and g2.is_contiguous() and u2.is_contiguous():
            x2, up = g2, u2  # the dropout kernel forms silu(gate) * up itself: one pass over gate and up less
        else:
            x2, up = _swiglu(g2, u2, ctx.use_kernels), None
        needs_x = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_x, grad_a, grad_b = _lora_backward(x2, w, a, b, h, g, rng, ctx.scale, ctx.p,
                                                (needs_x, ctx.needs_input_grad[4], ctx.needs_input_grad[5]), up)
        del x2
        grad_gate = grad_up = None
        if needs_x:
            # written into the kept gate and up (Liger's SwiGLU does the same): nothing else holds them
            grad_gate, grad_up = _swiglu_backward_(grad_x, g2, u2, ctx.use_kernels)
            shape = grad.shape[:-1] + (g2.shape[-1],)
            grad_gate = grad_gate.view(shape).to(ctx.in_dtypes[0])
            grad_up = grad_up.view(shape).to(ctx.in_dtypes[1])
        return (grad_gate, grad_up, None, None, None if grad_a is None else grad_a.to(ctx.a_dtype),
                None if grad_b is None else grad_b.to(ctx.b_dtype), None, None, None, None)


@functools.cache
def _lora_linear_class():
    """(PEFT's LoRA `Linear`, our `FusedLoraLinear` subclass), built on first use so importing this module
    does not import PEFT; `internvl_lora.lora.fused.FusedLoraLinear` resolves to it (pickling, isinstance)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    class FusedLoraLinear(LoraLinear):
        """PEFT's LoRA `Linear`, whose training forward runs as one `_LoraLinear` node.

        Same parameters, buffers, names and hooks (the class of an existing instance is changed), so
        saving, loading, merging and the optimizer see PEFT's module. Anything but the plain case -- no
        gradient, eval mode, merged or disabled adapters, several active adapters, extra arguments,
        mixed dtypes without autocast -- goes to PEFT's own forward. `use_kernels`: the dropout inside
        Triton kernels on a GPU (`internvl_lora.lora.kernels`; else torch's dropout).
        """

        use_kernels: bool = True

        def _fused_args(self, x, *args, **kwargs):
            """(weight, bias, A, B, scale, p, dtype) for the fused path, or None where PEFT's forward runs."""
            if args or kwargs or not self.training or not torch.is_grad_enabled() or self.merged \
                    or self.disable_adapters:
                return None
            active = self.active_adapters
            if len(active) != 1 or active[0] not in self.lora_A or active[0] in self.lora_variant:
                return None
            name = active[0]
            base, lora_a, lora_b = self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight
            dev = x.device.type
            if torch.is_autocast_enabled(dev):
                dtype = torch.get_autocast_dtype(dev)
            elif x.dtype == base.weight.dtype == lora_a.dtype == lora_b.dtype:
                dtype = x.dtype
            else:
                return None
            drop = self.lora_dropout[name]
            p = float(drop.p) if isinstance(drop, torch.nn.Dropout) else 0.0
            return base.weight, base.bias, lora_a, lora_b, float(self.scaling[name]), p, dtype

        def forward(self, x, *args, **kwargs):
            fused = self._fused_args(x, *args, **kwargs)
            if fused is None:
                return super().forward(x, *args, **kwargs)
            with torch.autocast(x.device.type, enabled=False):
                return _LoraLinear.apply(x, *fused, self.use_kernels)

        def forward_swiglu(self, gate, up):
            """self(silu(gate) * up), keeping gate and up but not their product (`_SwiGLULoraLinear`)."""
            fused = self._fused_args(gate)
            if fused is None or gate.shape != up.shape:
                return self(F.silu(gate) * up)
            with torch.autocast(gate.device.type, enabled=False):
                return _SwiGLULoraLinear.apply(gate, up, *fused, self.use_kernels)

    FusedLoraLinear.__module__, FusedLoraLinear.__qualname__ = __name__, "FusedLoraLinear"
    return LoraLinear, FusedLoraLinear


def __getattr__(name):
    if name == "FusedLoraLinear":
        return _lora_linear_class()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fuse_lora_layers(model, kernels: bool = True) -> int:
    """Give every plain LoRA `Linear` of a PEFT model the fused training forward (`_LoraLinear`).

    PEFT computes base(x) + B(A(dropout(x.float()))) * s as separate modules: per adapted projection
    a float32 copy of the input, a dropped copy and its mask kept for the backward, and about a dozen
    autograd nodes and kernel launches. The fused forward is the same computation in one node, keeping
    only the input (with torch's dropout: the same generator draws, equal to PEFT's numbers in float32;
    with `kernels` on a GPU the masks come from `internvl_lora.lora.kernels`, another random stream of the
    same distribution). Plain means: an `nn.Linear` base with frozen weight and bias, no DoRA or other
    variant, no LoRA bias, dropout or none. Returns the number of layers changed. Call after the adapters
    are injected, before training.
    """
    lora_linear, fused = _lora_linear_class()
    changed = 0
    for module in model.modules():
        if type(module) is not lora_linear or module.lora_variant or module.fan_in_fan_out:
            continue
        base = module.base_layer
        if type(base) is not torch.nn.Linear or any(p.requires_grad for p in base.parameters()):
            continue
        layers = list(module.lora_A.values()) + list(module.lora_B.values())
        if any(type(m) is not torch.nn.Linear or m.bias is not None for m in layers):
            continue
        if not all(isinstance(d, (torch.nn.Dropout, torch.nn.Identity)) for d in module.lora_dropout.values()):
            continue
        module.__class__ = fused
        module.use_kernels = kernels
        changed += 1
    return changed


def _is_swiglu_mlp(module) -> bool:
    """down_proj(silu(gate_proj(x)) * up_proj(x)): transformers' gated MLPs with a SiLU `act_fn`, or
    Liger's SwiGLU MLP (which Liger also puts in place of the MLP class, for models built afterwards)."""
    from transformers.activations import SiLUActivation

    if isinstance(getattr(module, "act_fn", None), (torch.nn.SiLU, SiLUActivation)):
        return True
    try:
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    except ImportError:
        return False
    return type(module) is LigerSwiGLUMLP


@functools.cache
def _swiglu_mlp_class(mlp_class):
    class FusedSwiGLUMLP(mlp_class):
        """A gated MLP, down(silu(gate(x)) * up(x)), whose down projection keeps gate and up instead of
        their product (`FusedLoraLinear.forward_swiglu`). Same parameters and names."""

        fused_swiglu = True

        def forward(self, x):
            return self.down_proj.forward_swiglu(self.gate_proj(x), self.up_proj(x))

    FusedSwiGLUMLP.__name__ = FusedSwiGLUMLP.__qualname__ = f"FusedSwiGLU{mlp_class.__name__}"
    return FusedSwiGLUMLP


def fuse_swiglu_mlps(model) -> int:
    """Gated MLPs -- `down_proj(act_fn(gate_proj(x)) * up_proj(x))` with a SiLU, the Llama / Qwen layout --
    whose three projections are fused LoRA layers: the down projection then keeps gate and up (kept for
    the SwiGLU's backward anyway) instead of also keeping their product, one (tokens x intermediate)
    tensor less per layer (a quarter of a decoder layer's activations at the InternVL3 shapes), and the
    SwiGLU runs inside the same node. A forward that Liger bound to the instance (its SwiGLU MLP: the same
    computation) is replaced. Call after `fuse_lora_layers`. Returns the number of MLPs changed."""
    fused = _lora_linear_class()[1]
    changed = 0
    for module in model.modules():
        parts = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(type(m) is fused for m in parts) or not _is_swiglu_mlp(module):
            continue
        if getattr(type(module), "fused_swiglu", False):
            continue
        module.__dict__.pop("forward", None)  # Liger's bound SwiGLU forward
        module.__dict__.pop("_get_name", None)
        module.__class__ = _swiglu_mlp_class(type(module))
        changed += 1
    return changed
