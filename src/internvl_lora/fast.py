"""Speed levers for training: padding-free packing, varlen attention, loss on trained positions only.

- `PackedCollator` puts a batch into one row without padding; position ids restart at every sample
  and the sample boundaries go to the attention as cumulative lengths (`cu_seq_lens_q/k`).
- `VARLEN` is an attention implementation registered through transformers' public
  `AttentionInterface`: it attends within each packed sample only — torch's flash-based
  `varlen_attn` on a GPU, a per-sample SDPA loop elsewhere (the same numbers, slower). A batch without
  sample boundaries (evaluation, generation, padded batches) goes to SDPA with its padding mask.
- `trained_positions_loss` asks the model for logits only where a label is trained (the answers), via
  the public `logits_to_keep` argument, instead of materializing (tokens x vocab) logits for the whole
  sequence; the loss is the token sum over those positions divided by the number of trained tokens in
  the global batch (the Trainer's `num_items_in_batch`), i.e. the token mean over the global batch.

Generic: nothing here is specific to InternVL.
"""

from __future__ import annotations

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
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    keep = (shifted != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    if keep.numel() == 0:
        # No trained token: a zero that still depends on the parameters, so every rank joins the backward.
        out = model(**inputs, use_cache=False, logits_to_keep=torch.zeros(1, dtype=torch.long, device=labels.device))
        return out.logits.sum() * 0.0
    out = model(**inputs, use_cache=False, logits_to_keep=keep)
    logits = out.logits.float()  # (B, len(keep), V)
    target = shifted[:, keep]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                         reduction="none")
    if reduction == "token":
        loss = ce.sum()
        denom = num_items_in_batch if num_items_in_batch is not None else (target != IGNORE_INDEX).sum()
    else:
        w = loss_weights(labels, inputs.get("cu_seq_lens_q"), reduction)
        w_shifted = torch.zeros_like(w)
        w_shifted[:, :-1] = w[:, 1:]  # the weight of a label goes where it is predicted, like the label
        w_keep = w_shifted[:, keep].reshape(-1)
        loss = (ce * w_keep).sum()
        denom = num_items_in_batch if num_items_in_batch is not None else w_keep.sum()
    if isinstance(denom, torch.Tensor):
        denom = denom.to(loss.device)
    return loss / denom


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
# LoRA input path: one shared input, dropout recomputed in the backward


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


class _DropoutLinear(torch.autograd.Function):
    """y = dropout(x) @ W^T that keeps only x (and the generator state), never the dropped copy or its mask.

    On a GPU the backward draws the same mask again from the saved generator state (as activation
    checkpointing does; the draw is cheap there). On a CPU, where drawing is the expensive part, the mask
    is kept instead (1 byte per element; still no dropped copy). x is the tensor the layer received, so
    the q/k/v (and gate/up) adapters of one layer all keep the same tensor instead of one copy each.
    """

    @staticmethod
    def forward(ctx, x, weight, p: float):
        w = weight.to(x.dtype)
        ctx.p, ctx.weight_dtype, ctx.state = p, weight.dtype, None
        mask = None
        if p > 0:
            if x.is_cuda:
                ctx.state = _rng_state(x.device)
            dropped, mask = torch.native_dropout(x, p, True)
        else:
            dropped = x
        ctx.save_for_backward(x, w, mask if (mask is not None and ctx.state is None) else None)
        return F.linear(dropped, w)

    @staticmethod
    def backward(ctx, grad):
        x, w, mask = ctx.saved_tensors
        p = ctx.p
        if ctx.state is not None:
            dropped, mask = _with_rng_state(x.device, ctx.state, lambda: torch.native_dropout(x, p, True))
        elif mask is not None:
            dropped = torch.ops.aten.native_dropout_backward(x, mask, 1.0 / (1.0 - p))  # x * mask / (1 - p)
        else:
            dropped = x
        grad = grad.to(w.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ w
            if mask is not None:
                grad_x = torch.ops.aten.native_dropout_backward(grad_x, mask, 1.0 / (1.0 - p))
        if ctx.needs_input_grad[1]:
            grad_w = (grad.reshape(-1, grad.shape[-1]).t() @ dropped.reshape(-1, dropped.shape[-1])).to(ctx.weight_dtype)
        return grad_x, grad_w, None


class DropoutLoraA(torch.nn.Linear):
    """A LoRA A matrix that applies the adapter's dropout itself (see `_DropoutLinear`).

    Same parameter (`weight`, same name and object), so saving, loading, merging and optimizer
    state are unchanged. Under autocast the product runs in the autocast dtype, as `nn.Linear` would.
    """

    p: float = 0.0

    def forward(self, x):
        p = self.p if self.training else 0.0
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            x = x.to(torch.get_autocast_dtype(dev))
            with torch.autocast(dev, enabled=False):
                return _DropoutLinear.apply(x, self.weight, p)
        return _DropoutLinear.apply(x.to(self.weight.dtype), self.weight, p)


def fuse_lora_inputs(model) -> int:
    """Let every plain LoRA layer (no DoRA or other variant) of a PEFT model feed its input to LoRA A as is.

    PEFT casts the layer input to the adapter dtype (float32 copies next to a bfloat16 base), applies
    dropout and keeps the dropped copy and its mask for the backward, once per adapted projection.
    Here LoRA A does the dropout itself and keeps only the input (`DropoutLoraA`). The result is the same
    computation, with the mask drawn from the same generator (equal to PEFT's numbers in float32).
    Returns the number of LoRA modules changed. Call after the adapters are injected, before training.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    changed = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear):
            continue
        for name, lora_a in list(module.lora_A.items()):
            if name in module.lora_variant or type(lora_a) is not torch.nn.Linear or lora_a.bias is not None:
                continue
            drop = module.lora_dropout[name]
            if isinstance(drop, torch.nn.Dropout):
                p = float(drop.p)
            elif isinstance(drop, torch.nn.Identity):
                p = 0.0
            else:
                continue
            lora_a.__class__ = DropoutLoraA  # keeps the Parameter object, its name and any hooks
            lora_a.p = p
            module.lora_dropout[name] = torch.nn.Identity()
            changed += 1
        if all(type(a) is DropoutLoraA for a in module.lora_A.values()):
            module.cast_input_dtype_enabled = False  # DropoutLoraA casts the input itself when autocast is off
    return changed
