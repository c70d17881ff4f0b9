"""The training loss: logits only where a label is trained, optionally formed a chunk at a time.

`trained_positions_loss` asks the model for logits only where a label is trained (the answers), via
the public `logits_to_keep` argument, instead of materializing (tokens x vocab) logits for the whole
sequence; the loss is the token sum over those positions divided by the number of trained tokens in
the global batch (the Trainer's `num_items_in_batch`), i.e. the token mean over the global batch.
With `chunk_output_layer` the model returns hidden states there instead, and the loss forms the
logits a chunk of positions at a time (`DeferredHead`, `_ChunkedLinearCrossEntropy`). `loss_weights`
gives the per-token weights of the `sample` / `square` reductions.

Generic: nothing here is specific to InternVL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.collate import trained_positions
from ..internvl.constants import IGNORE_INDEX


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


def _aligned_rows(vocab: int, hidden: torch.Tensor) -> int:
    """How many vocabulary rows the chunk's large matmuls take (the rest in a small one): on a GPU the
    vocabulary's last multiple of 64 when it is not one itself (151,674 in InternVL's Qwen2 tokenizers:
    cuBLAS then picks kernels for unaligned rows, at well under half the matmul rate), else all of them."""
    return vocab // 64 * 64 if hidden.is_cuda and vocab % 64 and vocab > 64 else vocab


def _chunk_logits(h, w, buf, aligned: int):
    """h @ w^T (rows x vocab) into `buf` (rows at least vocab long), the first `aligned` columns in one
    matmul (on a GPU: sizes and strides multiples of 64), the rest in another."""
    vocab = w.shape[0]
    torch.mm(h, w[:aligned].t(), out=buf[:, :aligned])
    if aligned < vocab:
        torch.mm(h, w[aligned:].t(), out=buf[:, aligned:vocab])
    return buf[:, :vocab]


def _chunk_grad_h(g, w, out, aligned: int):
    """g @ w into `out`, the reduction over the vocabulary split like `_chunk_logits` (g: a row-padded view)."""
    vocab = w.shape[0]
    torch.mm(g[:, :aligned], w[:aligned], out=out)
    if aligned < vocab:
        out.addmm_(g[:, aligned:vocab], w[aligned:])


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(h_i W^T, t_i) without the (positions x vocab) logits: chunks of positions at a time.

    Each chunk's logits are formed in the output layer's dtype (autocast's, or the weight's),
    turned into float32 log-probabilities, and their gradient with respect to the hidden states (and to
    W, when it is trained) is computed right there; the backward only scales the stored gradients. Peak
    extra memory: a few float32 buffers of `chunk x vocab`. Targets equal to IGNORE_INDEX contribute 0.
    A chunk's logits and then its gradient live in one buffer in the compute dtype; on a GPU its rows are
    padded to a multiple of 64 and the matmuls take the vocabulary's aligned part and its few last rows
    separately (`_aligned_rows`): the same products, at the matmul rate of aligned shapes.
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
        aligned = _aligned_rows(vocab, hidden)
        # one chunk's 16-bit logits, then its gradient; rows padded to 64 where the matmuls are split
        width = vocab if aligned == vocab else -(-vocab // 64) * 64
        buf = torch.empty(min(chunk, hidden.shape[0]), width, dtype=dtype, device=hidden.device)
        valid = target != IGNORE_INDEX
        safe = torch.where(valid, target, torch.zeros_like(target))
        scale = valid.float() if weights is None else weights.float() * valid
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(dev, enabled=False):
            for a in range(0, hidden.shape[0], chunk):
                h, t, s = hidden[a:a + chunk], safe[a:a + chunk], scale[a:a + chunk]
                # the chunk's logits in float32; everything below works in place on this buffer
                z = _chunk_logits(h, w, buf[:len(h)], aligned).float()
                picked = z.gather(1, t[:, None]).squeeze(1)
                top = z.amax(dim=-1, keepdim=True)
                z.sub_(top).exp_()
                norm = z.sum(dim=-1, keepdim=True)
                lse = top.squeeze(1) + norm.squeeze(1).log()
                total += ((lse - picked) * s).sum()
                z.div_(norm)  # softmax; d CE / d logits = softmax - onehot, times the position's weight
                z[torch.arange(len(t), device=t.device), t] -= 1.0
                g = buf[:len(h), :vocab]
                g.copy_(z.mul_(s[:, None]))  # rounded to the compute dtype, over the chunk's logits
                del z
                _chunk_grad_h(buf[:len(h)], w, grad_h[a:a + chunk], aligned)
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
