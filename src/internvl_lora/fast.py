"""Speed levers for training: padding-free packing, varlen attention, loss on trained positions only.

- `PackedCollator` puts a batch into one row without padding; position ids restart at every sample
  and the sample boundaries go to the attention as cumulative lengths (`cu_seq_lens_q/k`).
- `VARLEN` is an attention implementation registered through transformers' public
  `AttentionInterface`: it attends within each packed sample only — torch's flash-based
  `varlen_attn` on a GPU, a per-sample SDPA loop elsewhere (the same numbers, slower).
- `trained_positions_loss` asks the model for logits only where a label is trained (the answers), via
  the public `logits_to_keep` argument, instead of materializing (tokens x vocab) logits for the whole
  sequence; the loss is the token sum over those positions divided by the number of trained tokens in
  the global batch (the Trainer's `num_items_in_batch`), i.e. the token mean over the global batch.

Generic: nothing here is specific to InternVL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    if cu is None:
        raise ValueError(f"attention '{VARLEN}' needs cu_seq_lens_q (use the packed collator)")
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


def register_varlen_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, _varlen_attention)
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


def trained_positions_loss(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """Causal-LM loss computing logits only at positions whose next token is trained."""
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
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else (target != IGNORE_INDEX).sum()
    if isinstance(denom, torch.Tensor):
        denom = denom.to(loss.device)
    return loss / denom
