"""Speed levers for training: padding-free packing, varlen attention, loss on trained positions only.

- `PackedCollator` puts a batch into one row without padding; position ids restart at every sample
  and the sample boundaries go to the attention as cumulative lengths (`cu_seq_lens_q/k`).
- `VARLEN` is an attention implementation registered through transformers' public
  `AttentionInterface`: it attends within each packed sample only — torch's flash-based
  `varlen_attn` on a GPU, a per-sample SDPA loop elsewhere (the same numbers, slower). A batch without
  sample boundaries (evaluation, generation, padded batches) goes to SDPA with its padding mask.
- `HostSide` (around the collator) works out on the host what the step would otherwise read back from
  the GPU (the trained positions, token counts), so the host never waits for the GPU mid-step.
- `trained_positions_loss` asks the model for logits only where a label is trained (the answers), via
  the public `logits_to_keep` argument, instead of materializing (tokens x vocab) logits for the whole
  sequence; the loss is the token sum over those positions divided by the number of trained tokens in
  the global batch (the Trainer's `num_items_in_batch`), i.e. the token mean over the global batch.
  With `chunk_output_layer` the model returns hidden states there instead, and the loss forms the
  logits a chunk of positions at a time (`DeferredHead`, `_ChunkedLinearCrossEntropy`).
- `fuse_lora_layers` gives PEFT's LoRA layers a training forward that runs as one autograd node and
  keeps only the layer input (`FusedLoraLinear`); recomputation, kernels and compilation helpers follow.

Generic: nothing here is specific to InternVL.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .errors import UserError
from .internvl.constants import IGNORE_INDEX

VARLEN = "packed_varlen"


def _varlen_supports_gqa() -> bool:
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        return "enable_gqa" in inspect.signature(varlen_attn).parameters
    except Exception:
        return False


_VARLEN_GQA = _varlen_supports_gqa()


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query (1, H, T, D), key/value (1, KV, T, D) -> (1, T, H, D), attending within each packed sample."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # an ordinary batch (evaluation, generation, a padded batch): plain SDPA with its mask
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    max_len = int(kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max()))
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, D)
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        if k.shape[1] != q.shape[1] and not _VARLEN_GQA:
            # Older torch (< 2.13) has no enable_gqa here: repeat the key/value heads.
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        extra = {"enable_gqa": True} if _VARLEN_GQA else {}
        out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, window_size=(-1, 0), **extra)
    else:
        outs = []
        bounds = cu.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            qq, kk, vv = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scaling, enable_gqa=True)
            outs.append(o[0].transpose(0, 1))
        out = torch.cat(outs)
    return out.unsqueeze(0), None


def _varlen_mask(*args, attention_mask=None, **kwargs):
    """No mask for packed rows (they carry no padding mask; the boundaries travel as cu_seq_lens); the
    SDPA mask when a padding mask is given, for the SDPA fallback of `_varlen_attention`."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> str:
    """Register `VARLEN`: packed batches attend per sample; any other batch falls back to SDPA, so a model
    trained with packing still evaluates and generates on ordinary (padded) batches."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, _varlen_attention)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)
    return VARLEN


class PackedCollator:
    """All samples of a batch in one row, no padding; tiles concatenated in sample order."""

    def __call__(self, features: list[dict]) -> dict:
        ids, labels, positions, lengths, pixels = [], [], [], [], []
        for f in features:
            n = len(f["input_ids"])
            lab = f["labels"].clone()
            lab[0] = IGNORE_INDEX  # the previous sample's last token must not learn to predict this one
            ids.append(f["input_ids"])
            labels.append(lab)
            positions.append(torch.arange(n))
            lengths.append(n)
            if "pixel_values" in f:
                pixels.append(f["pixel_values"])
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
        batch = {
            "input_ids": torch.cat(ids).unsqueeze(0), "labels": torch.cat(labels).unsqueeze(0),
            "position_ids": torch.cat(positions).unsqueeze(0),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths),
        }
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        return batch


HOST_SIDE_KEYS = ("trained_positions", "batch_counts")


def batch_counts(batch: dict) -> dict:
    """Tokens, trained tokens (labels past position 0 of a row, as the loss shifts them) and image tiles
    of a micro-batch, as Python ints."""
    labels = batch.get("labels")
    mask = batch.get("attention_mask")
    return {
        "tokens": int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()),
        "trained": int((labels[..., 1:] != IGNORE_INDEX).sum()) if labels is not None else 0,
        "tiles": int(batch["pixel_values"].shape[0]) if batch.get("pixel_values") is not None else 0,
    }


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions (columns) whose next token is trained in some row: where the loss needs logits."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)


class HostSide:
    """Wraps a collator: adds what the training step needs to know about a micro-batch, computed on the
    host before the batch goes to the GPU -- `trained_positions` for `trained_positions_loss` and
    `batch_counts` for the step statistics. Read from the GPU instead, each would stop the host until
    the GPU has caught up with everything queued (a synchronization), every micro-batch, leaving the GPU
    idle while the host prepares the next work. Both keys are removed before the model is called."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, features: list[dict]) -> dict:
        batch = self.inner(features)
        if "labels" in batch:
            batch["trained_positions"] = trained_positions(batch["labels"])
        batch["batch_counts"] = batch_counts(batch)
        return batch


def loss_weights(labels: torch.Tensor, cu_seq_lens: torch.Tensor | None = None, reduction: str = "token") -> torch.Tensor:
    """Per-token loss weights, same shape as `labels` (0 where a label is not trained).

    token: 1 per trained token; sample: 1/n and square: 1/sqrt(n), with n the number of trained
    tokens of the sample the token belongs to (a padded row, or a packed segment given by
    `cu_seq_lens`) -- the official `loss_reduction` / `len2weight`.
    """
    trained = labels != IGNORE_INDEX
    if reduction == "token":
        return trained.float()
    if reduction not in ("sample", "square"):
        raise ValueError(f"unknown loss reduction {reduction!r}")
    if cu_seq_lens is None:
        n = trained.sum(dim=-1, keepdim=True).expand_as(trained).float()
    else:
        flat = trained.reshape(-1)
        cu = cu_seq_lens.to(flat.device).long()
        segment = torch.bucketize(torch.arange(flat.numel(), device=flat.device), cu[1:], right=True)
        per_segment = torch.zeros(len(cu) - 1, device=flat.device).index_add_(0, segment, flat.float())
        n = per_segment[segment].reshape(trained.shape)
    w = 1.0 / n.clamp(min=1) if reduction == "sample" else n.clamp(min=1).rsqrt()
    return torch.where(trained, w, torch.zeros_like(w))


def trained_positions_loss(model, inputs: dict, num_items_in_batch=None, reduction: str = "token") -> torch.Tensor:
    """Causal-LM loss computing logits only at positions whose next token is trained.

    The loss is sum(w * CE) over the trained positions divided by `num_items_in_batch` -- the sum of the
    weights over the global batch (the number of trained tokens for `token`) -- or by this batch's own
    sum when it is not given. `w` comes from `loss_weights`.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    keep = inputs.pop("trained_positions", None)  # computed on the host by `HostSide`: no sync here
    inputs.pop("batch_counts", None)
    if keep is None:
        keep = trained_positions(labels)
    keep = keep.to(labels.device)
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    if keep.numel() == 0:
        # No trained token: a zero that still depends on the parameters, so every rank joins the backward.
        out = model(**inputs, use_cache=False, logits_to_keep=torch.zeros(1, dtype=torch.long, device=labels.device))
        return out.logits.sum() * 0.0
    head = _deferred_head(model)
    if reduction == "token":
        w_keep = None
    else:
        w = loss_weights(labels, inputs.get("cu_seq_lens_q"), reduction)
        w_shifted = torch.zeros_like(w)
        w_shifted[:, :-1] = w[:, 1:]  # the weight of a label goes where it is predicted, like the label
        w_keep = w_shifted[:, keep].reshape(-1)
    target = shifted[:, keep].reshape(-1)
    if head is not None:  # hidden states at the kept positions; logits one chunk at a time
        head.defer = True
        try:
            hidden = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        finally:
            head.defer = False
        loss = _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, target, w_keep)
    else:
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits.float()  # (B, len(keep), V)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target, ignore_index=IGNORE_INDEX,
                             reduction="none")
        loss = ce.sum() if w_keep is None else (ce * w_keep).sum()
    if num_items_in_batch is not None:
        denom = num_items_in_batch
    else:  # this batch's own sum of weights
        denom = (target != IGNORE_INDEX).sum() if w_keep is None else w_keep.sum()
    if isinstance(denom, torch.Tensor):
        denom = denom.to(loss.device)
    return loss / denom


class DeferredHead(torch.nn.Linear):
    """The output layer (lm_head), able to hand back its input instead of logits while `defer` is set.

    `trained_positions_loss` sets `defer` around the model call, so the model (and any wrapper: DDP,
    DeepSpeed) runs as usual but returns the final hidden states at the kept positions; the logits
    are then formed one chunk of positions at a time inside the loss (`_ChunkedLinearCrossEntropy`).
    Same parameter and name as the `nn.Linear` it replaces (the class of the instance is changed).
    """

    defer: bool = False

    def forward(self, x):
        return x if self.defer else super().forward(x)


def chunk_output_layer(model) -> bool:
    """Let the loss form logits in chunks (see `DeferredHead`). Only for a plain `nn.Linear` output layer
    without bias whose weight is whole on this device (not under ZeRO-3 / FSDP, whose weights are
    gathered only during the module's own forward). Returns whether it was done."""
    try:
        head = model.get_output_embeddings()
    except AttributeError:
        return False
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return False
    head.__class__ = DeferredHead
    return True


def _deferred_head(model):
    get = getattr(model, "get_output_embeddings", None)
    if get is None and hasattr(model, "module"):  # DDP and other wrappers
        get = getattr(model.module, "get_output_embeddings", None)
    head = get() if get is not None else None
    return head if isinstance(head, DeferredHead) else None


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(h_i W^T, t_i) without the (positions x vocab) logits: chunks of positions at a time.

    Each chunk's logits are formed in the output layer's dtype (autocast's, or the weight's),
    turned into float32 log-probabilities, and their gradient with respect to the hidden states (and to
    W, when it is trained) is computed right there; the backward only scales the stored gradients. Peak
    extra memory: a few float32 buffers of `chunk x vocab`. Targets equal to IGNORE_INDEX contribute 0.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, weights, chunk_elements: int = 2**25):
        dev = hidden.device.type
        # The output layer's compute dtype: autocast's, or else the weight's. The hidden states may arrive
        # in float32 only because the Trainer's mixed precision (accelerate) converts a model's outputs to
        # float32 and the loss runs outside its autocast; computing in float32 then would copy the weight
        # to float32 (2 GiB at a 150k vocabulary) and run slow non-tensor-core matmuls.
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        ctx.hidden_dtype = hidden.dtype
        hidden = hidden.to(dtype)
        w = weight.to(dtype)
        vocab = w.shape[0]
        chunk = max(1, chunk_elements // vocab)
        valid = target != IGNORE_INDEX
        safe = torch.where(valid, target, torch.zeros_like(target))
        scale = valid.float() if weights is None else weights.float() * valid
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(dev, enabled=False):
            for a in range(0, hidden.shape[0], chunk):
                h, t, s = hidden[a:a + chunk], safe[a:a + chunk], scale[a:a + chunk]
                z = (h @ w.t()).float()  # the chunk's logits; everything below works in place on this buffer
                picked = z.gather(1, t[:, None]).squeeze(1)
                top = z.amax(dim=-1, keepdim=True)
                z.sub_(top).exp_()
                norm = z.sum(dim=-1, keepdim=True)
                lse = top.squeeze(1) + norm.squeeze(1).log()
                total += ((lse - picked) * s).sum()
                z.div_(norm)  # softmax; d CE / d logits = softmax - onehot, times the position's weight
                z[torch.arange(len(t), device=t.device), t] -= 1.0
                g = z.mul_(s[:, None]).to(dtype)
                del z
                grad_h[a:a + chunk] = g @ w
                if grad_w is not None:
                    grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad.to(grad_h.dtype)).to(ctx.hidden_dtype)
        gw = None if grad_w is None else (grad_w * grad).to(ctx.weight_dtype)
        return gh, gw, None, None, None


# ---------------------------------------------------------------------------------------------------
# Recomputation, kernels, compilation


def checkpoint_some_layers(layers, share: float) -> list[int]:
    """Keep activation checkpointing on `share` of `layers` (evenly spread), turn it off on the others.

    Works on transformers' `GradientCheckpointingLayer`s after checkpointing was enabled (their public
    `gradient_checkpointing` flag). Returns the indices that stay checkpointed.
    """
    n = len(layers)
    k = round(share * n)
    chosen = sorted({int(i * n / k) for i in range(k)}) if k else []
    for i, layer in enumerate(layers):
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = layer.gradient_checkpointing and i in chosen
    return chosen


def apply_liger(language_model) -> str:
    """Liger kernels (RMSNorm, SwiGLU, RoPE) on one decoder-only model instance, by its model type.

    The cross-entropy kernels stay off: the loss here computes logits at trained positions only.
    """
    model_type = language_model.config.model_type
    try:
        import liger_kernel.transformers as liger
    except ImportError:
        raise UserError("train.liger needs the liger-kernel package (pip install liger-kernel) and a GPU") from None
    fn = getattr(liger, f"apply_liger_kernel_to_{model_type}", None)
    if fn is None:
        raise UserError(f"train.liger: liger-kernel has no kernels for {model_type!r} models; set train.liger=false")
    fn(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False,
       model=language_model)
    return model_type


def compile_layers(layers) -> int:
    """torch.compile each decoder layer in place (the same compiled code serves every layer)."""
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


# ---------------------------------------------------------------------------------------------------
# Fused LoRA layer: base projection + adapter in one autograd node, dropout recomputed in the backward


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
    """`internvl_lora.kernels` when they take this layer (dropout on, CUDA, 16-bit, triton), else None."""
    if not use_kernels or p <= 0 or not x2.is_cuda or torch.cuda.is_current_stream_capturing():
        return None
    from . import kernels

    return kernels if kernels.supported(x2, a) else None


def _lora_forward(x2, w, bias, a, b, scale: float, p: float, use_kernels: bool):
    """y = x2 W^T + bias + scale * (dropout(x2) A^T) B^T for a 2-D input, all in one dtype.

    Returns y, h = scale * dropout(x2) A^T (tokens x r), and how to draw the same dropout mask again in
    the backward: (generator state, kept mask, kernel seed) -- one of them set when p > 0.
    With `internvl_lora.kernels` (a GPU): the mask is a function of a seed, drawn inside the kernel that
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


def _lora_backward(x2, w, a, b, h, g, rng, scale: float, p: float, needs):
    """Gradients (x2, A, B) of `_lora_forward` for the output gradient g (2-D, the compute dtype), in the
    compute dtype; `needs` says which are wanted."""
    state, mask, seed = rng
    grad_x = grad_a = grad_b = None
    gh = g @ b  # gradient of h / scale
    if needs[2]:
        grad_b = g.t() @ h
    gh = gh.mul_(scale)
    if seed is not None:
        from . import kernels

        if needs[1]:
            grad_a = kernels.lora_a_grad(gh, x2, seed, p)
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
    formed again exactly)."""

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
        x2 = _swiglu(g2, u2, ctx.use_kernels)
        rng = (ctx.rng[0], mask, ctx.rng[2])
        needs_x = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_x, grad_a, grad_b = _lora_backward(x2, w, a, b, h, g, rng, ctx.scale, ctx.p,
                                                (needs_x, ctx.needs_input_grad[4], ctx.needs_input_grad[5]))
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
    does not import PEFT; `internvl_lora.fast.FusedLoraLinear` resolves to it (pickling, isinstance)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    class FusedLoraLinear(LoraLinear):
        """PEFT's LoRA `Linear`, whose training forward runs as one `_LoraLinear` node.

        Same parameters, buffers, names and hooks (the class of an existing instance is changed), so
        saving, loading, merging and the optimizer see PEFT's module. Anything but the plain case -- no
        gradient, eval mode, merged or disabled adapters, several active adapters, extra arguments,
        mixed dtypes without autocast -- goes to PEFT's own forward. `use_kernels`: the dropout inside
        Triton kernels on a GPU (`internvl_lora.kernels`; else torch's dropout).
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
    with `kernels` on a GPU the masks come from `internvl_lora.kernels`, another random stream of the
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
