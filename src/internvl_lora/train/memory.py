"""Activation memory planning for `train.checkpoint_layers=auto`: recompute as few decoder layers as the
GPU's free memory allows for the run's longest micro-batch.

A decoder layer that keeps its activations holds `kept` bytes per token until the backward pass; a
recomputed (checkpointed) one holds only its input (`hidden x element size` per token) and, during the
backward pass, one layer's activations at a time. `layer_bytes_per_token` measures `kept` on the device
by running one real decoder layer (with the run's adapters, fused paths and attention) on two token
counts: the difference is what a token costs, whatever kernels the layer uses. `plan_checkpointed_layers`
then picks the smallest number of recomputed layers whose estimate fits the free memory less a reserve
(the optimizer's state, the loss's logits chunks and the vision tower's transient memory). The probe runs
under the step's autocast (`training_autocast`): outside it, PEFT's float32 adapters on a 16-bit base take
PEFT's own forward (a float32 copy of the input, a dropped copy and a mask per projection) instead of the
fused path a step takes, and the probe read 2.7x what the layer keeps at the 8B shape (372 against 140 KiB
per token). Measured against a whole stack under autocast (H100): within 0.1 % for plain Qwen2 layers,
between 1 % below and 13 % above with our fused LoRA layers (two runs); what is not per token falls to
the reserve (`reserve_bytes`).

Generic: a transformers decoder-only language model (its layers and rotary embedding), nothing specific
to InternVL.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class MemoryPlan:
    layers: int  # decoder layers of the LLM
    checkpointed: int  # how many are recomputed
    tokens: int  # the longest micro-batch planned for
    kept_per_token: float  # bytes one non-recomputed layer keeps per token
    estimate: float  # bytes of activations the plan needs at its peak
    budget: float  # bytes available for activations

    @property
    def share(self) -> float:
        return self.checkpointed / self.layers if self.layers else 1.0

    @property
    def fits(self) -> bool:
        return self.estimate <= self.budget

    def describe(self) -> str:
        gib = 2**30
        return (f"{self.checkpointed} of {self.layers} LLM decoder layers recomputed for micro-batches of up to "
                f"{self.tokens:,} tokens (train.checkpoint_layers=auto: each layer keeps "
                f"{self.kept_per_token / 1024:.0f} KiB per token; activations {self.estimate / gib:.1f} GiB of "
                f"{self.budget / gib:.1f} GiB free)")


def activation_bytes(layers: int, checkpointed: int, tokens: int, kept: float, hidden_bytes: float) -> float:
    """Peak activation bytes of the decoder stack with `checkpointed` of `layers` recomputed: the kept
    layers' activations, the recomputed layers' inputs, and during the backward pass one recomputed
    layer's activations plus a few hidden-sized gradient buffers."""
    per_token = (layers - checkpointed) * kept + checkpointed * hidden_bytes
    if checkpointed:
        per_token += kept
    return tokens * (per_token + 4 * hidden_bytes)


def plan_checkpointed_layers(layers: int, tokens: int, kept: float, hidden_bytes: float, budget: float) -> MemoryPlan:
    """The fewest recomputed layers whose activations fit `budget` (all of them when none fits)."""
    for k in range(layers + 1):
        est = activation_bytes(layers, k, tokens, kept, hidden_bytes)
        if est <= budget:
            return MemoryPlan(layers, k, tokens, kept, est, budget)
    return MemoryPlan(layers, layers, tokens, kept, activation_bytes(layers, layers, tokens, kept, hidden_bytes), budget)


def layer_bytes_per_token(layer, rotary, hidden_size: int, dtype: torch.dtype, device, tokens=(256, 768)) -> float:
    """Bytes a decoder layer keeps for its backward pass per token, measured on `device` (CUDA): the
    allocator's growth across a forward with gradients, at two token counts, divided by their difference
    (what does not grow with the tokens, such as a weight's transpose, cancels)."""
    was_ckpt, was_training = getattr(layer, "gradient_checkpointing", False), layer.training
    layer.gradient_checkpointing = False
    layer.train()  # dropout masks count too
    kept = []
    try:
        # Measured on a second pass at each size: what a first call allocates once and keeps (e.g. a matmul
        # library's workspace) is not a cost of the tokens a step keeps.
        for n in (*tokens, *tokens):
            x, kwargs = _inputs(rotary, hidden_size, n, dtype, device, requires_grad=True)
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            with training_autocast(x):  # the path (and the memory) of a training step
                out = layer(x, attention_mask=None, **kwargs)
            torch.cuda.synchronize(device)
            kept.append(torch.cuda.memory_allocated(device) - before)
            del out, x, kwargs
    finally:
        layer.gradient_checkpointing = was_ckpt
        layer.train(was_training)
    return max((kept[3] - kept[2]) / (tokens[1] - tokens[0]), 0.0)


def _inputs(rotary, hidden_size: int, n: int, dtype, device, requires_grad: bool):
    """Random hidden states of one packed sample of `n` tokens and the keyword arguments of a decoder layer
    (positions, rotary embedding, packed-attention boundaries; plain attention ignores the latter)."""
    x = torch.randn(1, n, hidden_size, device=device, dtype=dtype, requires_grad=requires_grad)
    position_ids = torch.arange(n, device=device).unsqueeze(0)
    cu = torch.tensor([0, n], device=device, dtype=torch.int32)
    return x, {"position_ids": position_ids, "position_embeddings": rotary(x, position_ids),
               "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": n, "max_length_k": n}


def training_autocast(param: torch.Tensor):
    """The autocast a step of a 16-bit model runs under (the Trainer's bf16 / fp16 mixed precision: the
    weights' dtype), or none for a float32 model. A layer run outside a step (the kernel warm-up) runs
    under it to take the path a step takes: PEFT keeps float32 adapters on a 16-bit base, and the fused
    LoRA layers run those only under autocast (PEFT's own forward otherwise)."""
    if param.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(param.device.type, dtype=param.dtype)
    return contextlib.nullcontext()


def layer_inputs(decoder, n: int, dtype, device, requires_grad: bool = False):
    """`_inputs` for a layer of `decoder` (a transformers decoder model: `.rotary_emb`, `.config`)."""
    return _inputs(decoder.rotary_emb, decoder.config.hidden_size, n, dtype, device, requires_grad)


def reserve_bytes(total: int, trainable_bytes: int) -> int:
    """Memory kept out of the activation budget: Adam's two moments and the gradients of the trainable
    weights (created at the first step, after planning), and a margin for what is not modelled (the
    loss's logits chunks, the vision tower's transient memory, allocator fragmentation): 10 % of the card
    and at least 4 GiB."""
    return 3 * trainable_bytes + max(total // 10, 4 * 2**30)


def plan_for_model(decoder, tokens: int, trainable_bytes: int) -> MemoryPlan | None:
    """The plan for `decoder` (a transformers decoder model: `.layers`, `.rotary_emb`, `.config`) on its
    CUDA device; None when it is not on a CUDA device."""
    param = next(decoder.parameters())
    if param.device.type != "cuda":
        return None
    device = param.device
    layers = decoder.layers
    cfg = decoder.config
    kept = layer_bytes_per_token(layers[0], decoder.rotary_emb, cfg.hidden_size, param.dtype, device)
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by torch: reusable
    budget = max(free - reserve_bytes(total, trainable_bytes), 0)
    hidden_bytes = cfg.hidden_size * param.element_size()
    return plan_checkpointed_layers(len(layers), tokens, kept, hidden_bytes, budget)
