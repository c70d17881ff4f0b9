"""Speed levers of training: packed (varlen) attention, partial recomputation, Liger, the fused paths.

- `VARLEN` is an attention implementation registered through transformers' public
  `AttentionInterface`: it attends within each packed sample only -- torch's flash-based
  `varlen_attn` on a GPU, a per-sample SDPA loop elsewhere (the same numbers, slower). A batch without
  sample boundaries (evaluation, generation, padded batches) goes to SDPA with its padding mask.
- `packed_rows_without_mask_preparation` spares packed rows transformers' mask preparation (a host sync).
- `checkpoint_some_layers` keeps activation checkpointing on a share of the decoder layers.
- `frozen_towers_in_weight_dtype` runs a frozen vision tower and projector in bf16 with autocast off.
- `speed_options` applies the `train` section's choices (Liger, `train.fused`); `fused_paths` is the
  fused part with one switch per lever, for benchmarks. `backend_switches_restored` puts back the
  process-wide torch switches that `speed_options` changes.
- `warm_up_kernels` compiles the decoder layer's JIT kernels for the token counts a run meets at random,
  before the first step.

Generic: nothing here is specific to InternVL.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..subclass import runtime_subclass
from ..lora.fused import fuse_lora_layers, fuse_swiglu_mlps
from ..lora.policy import is_peft
from .loss import chunk_output_layer

VARLEN = "packed_varlen"


@functools.cache
def _varlen_supports_gqa() -> bool:
    """Whether torch's varlen_attn takes `enable_gqa` (torch >= 2.12, where it must be set for fewer key/value
    heads than query heads); asked on first use."""
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        return "enable_gqa" in inspect.signature(varlen_attn).parameters
    except Exception:
        return False


# LLMs (transformers model_type) whose attention the packed attention does not compute: gpt_oss adds a
# learned sink to every softmax and a sliding window to every other layer.
PACKING_UNSUPPORTED = {"gpt_oss": "attention sinks and sliding windows"}


def check_packing(llm_type: str, packing: bool) -> None:
    """Refuse `data.packing` for an LLM whose attention the packed attention would compute wrongly."""
    if packing and llm_type in PACKING_UNSUPPORTED:
        raise UserError(f"data.packing: the packed attention does not implement the {PACKING_UNSUPPORTED[llm_type]} "
                        f"of this checkpoint's LLM ({llm_type}); set data.packing=false (padded batches)")


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query (1, H, T, D), key/value (1, KV, T, D) -> (1, T, H, D), attending within each packed sample."""
    missing = [what for what, key_ in (("attention sinks", "s_aux"), ("sliding windows", "sliding_window"))
               if kwargs.get(key_) is not None]
    if missing:  # (`check_packing` refuses such LLMs first; this guards any other way in)
        raise UserError(f"the packed attention does not implement the {' and '.join(missing)} of "
                        f"{type(module).__name__}; train it with data.packing=false")
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # an ordinary batch (evaluation, generation, a padded batch): plain SDPA with its mask
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    max_len = int(kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max()))
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, D)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention.varlen import varlen_attn

        # The key/value heads go in as they are (grouped-query attention in the flash kernel itself; torch
        # 2.10 / 2.11 pass them through, 2.12+ want enable_gqa): repeating them to the query heads cost two
        # copies per layer, and both copies (heads / kv heads times the key/value size) were kept for the
        # backward.
        extra = {"enable_gqa": True} if k.shape[1] != q.shape[1] and _varlen_supports_gqa() else {}
        out = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scaling, window_size=(-1, 0), **extra)
    else:  # CPU, or float32 on a GPU (the flash-based varlen kernel takes fp16 / bf16 only): SDPA per sample
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


_SUPPORT_FLAGS = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn",
                  "flex_attention": "_supports_flex_attn"}


def set_attention(model, requested: str) -> list[str]:
    """Set the attention implementation `requested` on each part of a composite transformers model (a
    vision-language model's vision tower and language model) whose class supports it, eager on a part whose
    class does not (gpt_oss has no SDPA): transformers would refuse the whole model. Returns a note per
    part that differs from `requested`."""
    from transformers import PreTrainedModel

    flag = _SUPPORT_FLAGS.get(requested)
    subs = getattr(model.config, "sub_configs", None) or {}
    if flag is None or not subs:
        model.set_attn_implementation(requested)
        return []
    choice, notes = {}, []
    for key in subs:
        sub_config = getattr(model.config, key, None)
        part = next((m for m in model.modules() if isinstance(m, PreTrainedModel) and m.config is sub_config), None)
        if part is None:
            continue
        if getattr(part, flag, False):
            choice[key] = requested
        else:
            choice[key] = "eager"
            part_name = key.removesuffix("_config")
            notes.append(f"attention: {type(part).__name__} does not support {requested}; {part_name} part runs "
                         "eager attention")
    model.set_attn_implementation(choice if notes else requested)
    return notes


def register_varlen_attention() -> str:
    """Register `VARLEN`: packed batches attend per sample; any other batch falls back to SDPA, so a model
    trained with packing still evaluates and generates on ordinary (padded) batches."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, _varlen_attention)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)
    return VARLEN


def packed_rows_without_mask_preparation(model) -> bool:
    """With `VARLEN` attention, give packed rows (boundaries in `cu_seq_lens_q`, no attention mask) an empty
    4-D mask on their way into the language model; transformers returns a 4-D mask as it is instead of
    preparing one. Its preparation looks for packed samples in the position ids and reads the answer
    back on the host: a synchronization in every forward, the host waiting for the vision tower before
    it can queue the first decoder layer, the GPU idle meanwhile. `VARLEN` takes the boundaries of packed
    rows from `cu_seq_lens`, never a mask; other batches are left as they are. Returns whether it applies."""
    base = model.get_base_model() if is_peft(model) else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or getattr(getattr(decoder, "config", None), "_attn_implementation", None) != VARLEN:
        return False
    if getattr(decoder, "_packed_rows_hook", None) is None:
        decoder._packed_rows_hook = decoder.register_forward_pre_hook(_empty_mask_for_packed_rows, with_kwargs=True)
    return True


def _empty_mask_for_packed_rows(module, args, kwargs):
    if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("attention_mask") is None:
        return args, {**kwargs, "attention_mask": torch.empty(0, 0, 0, 0, dtype=torch.bool)}
    return None


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


def language_decoder(model):
    """The model's language model decoder (through a PEFT wrapper)."""
    base = model.get_base_model() if is_peft(model) else model
    return base.get_decoder()


def decoder_layers(model):
    """The decoder layers of the model's language model (through a PEFT wrapper)."""
    return language_decoder(model).layers


def _lora_kernels_available() -> bool:
    from ..lora.kernels import available

    return available()


@contextlib.contextmanager
def backend_switches_restored():
    """The process-wide torch backend switches that `speed_options` changes (SDPA's cuDNN backend),
    as they were on entry, restored on exit -- also when training fails."""
    cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)


FROZEN_TOWERS = ("vision_tower", "multi_modal_projector")


@runtime_subclass
def _weight_dtype_class(cls):
    class InWeightDtype(cls):
        """`cls`, frozen, run in its weights' dtype with autocast off (`frozen_towers_in_weight_dtype`)."""

        def forward(self, *args, **kwargs):
            dtype = self.weight_dtype
            device = next(self.parameters()).device.type
            if not torch.is_autocast_enabled(device):
                return super().forward(*args, **kwargs)

            def cast(x):
                return x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x

            with torch.autocast(device, enabled=False):
                return super().forward(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})

    return InWeightDtype


def frozen_towers_in_weight_dtype(model, names=FROZEN_TOWERS) -> list[str]:
    """Run the frozen submodules called `names` (a vision-language model's vision tower and projector) in
    their weights' 16-bit dtype with autocast off.

    Under autocast (the Trainer's bf16 / fp16 mixed precision) a LayerNorm runs in float32 and returns
    float32, so every linear layer after it casts its input back, and float32 layer-scale products follow:
    30 % of the vision tower's kernel time in a measured 8B-shape step (docs/benchmarks.md). A
    frozen tower builds no graph and its weights are already 16-bit, so it runs in their dtype, as a model
    converted to bf16 without autocast does (DeepSpeed's bf16 mode). A module with a trainable parameter
    (vision LoRA, a trained projector) or float32 / mixed weights keeps autocast. Returns the names changed.
    """
    done = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in names or getattr(module, "weight_dtype", None) is not None:
            continue
        params = list(module.parameters())
        dtypes = {p.dtype for p in params}
        if not params or any(p.requires_grad for p in params) or dtypes not in ({torch.bfloat16}, {torch.float16}):
            continue
        module.__class__ = _weight_dtype_class(type(module))
        module.weight_dtype = dtypes.pop()
        done.append(f"{name.rsplit('.', 1)[-1]} ({str(module.weight_dtype).removeprefix('torch.')})")
    return done


def speed_options(model, t, before_adapters: bool, sharded: bool = False) -> list[str]:
    """Apply the speed options of the `train` section `t`; called before and after the adapters are injected.

    Before: Liger kernels on the language model. After: on a GPU, SDPA without its cuDNN backend (call
    inside `backend_switches_restored`); packed rows past transformers' mask preparation
    (`packed_rows_without_mask_preparation`); frozen vision tower and projector without autocast
    (`frozen_towers_in_weight_dtype`); with `train.fused`, the fused paths (`fused_paths`). `sharded`:
    the weights are partitioned (ZeRO-3 / FSDP). Returns what was done.
    """
    done = []
    if before_adapters:
        if t.liger:
            done.append(f"liger kernels ({apply_liger(model.get_decoder())})")
        return done
    if torch.cuda.is_available() and torch.backends.cuda.cudnn_sdp_enabled():
        # cuDNN's attention builds an execution plan for every new input shape (70-80 ms each on an H200,
        # the GPU idle meanwhile), and the vision tower's batch -- the tiles of a micro-batch -- changes
        # shape from step to step; flash and memory-efficient SDPA have no per-shape setup.
        torch.backends.cuda.enable_cudnn_sdp(False)
        done.append("SDPA without cuDNN")
    if packed_rows_without_mask_preparation(model):
        done.append("packed rows without transformers' mask preparation (no host sync)")
    towers = [] if sharded else frozen_towers_in_weight_dtype(model)  # (FSDP may keep float32 shards)
    if towers:
        done.append(f"frozen {', '.join(towers)} without autocast")
    if t.fused:
        done += fused_paths(model, sharded)
    return done


def fused_paths(model, sharded: bool = False, lora: bool = True, kernels: bool = True, mlp: bool = True,
                chunked_loss: bool = True) -> list[str]:
    """The fused LoRA layers (`fuse_lora_layers`, their dropout in Triton kernels with `kernels`), SwiGLU
    MLPs (`fuse_swiglu_mlps`, with `mlp`) and the chunked loss (`chunk_output_layer`); `train.fused`
    turns all of them on, benchmarks choose one by one. Returns what was done."""
    done = []
    if lora and is_peft(model):
        if sharded:
            # Sharded weights are gathered and released around each module; the fused path has only
            # been run unsharded (1 GPU, DDP, ZeRO-1), so sharded runs keep PEFT's own path.
            done.append("fused LoRA layers off under ZeRO-3 / FSDP (PEFT's path)")
        else:
            done.append(f"fused LoRA layers: {fuse_lora_layers(model, kernels=kernels)}"
                        + (" (dropout in Triton kernels on the GPU)" if kernels and _lora_kernels_available() else ""))
            if mlp:
                done.append(f"fused SwiGLU MLPs: {fuse_swiglu_mlps(model)}")
    if chunked_loss:
        if sharded:  # the output layer's weight is whole only inside its own forward there
            done.append("chunked loss off under ZeRO-3 / FSDP")
        elif chunk_output_layer(model):
            done.append("chunked loss")
    return done


def warm_up_token_counts(sms: int) -> tuple[int, ...]:
    """Token counts of the kernel warm-up on a GPU with `sms` multiprocessors. Triton specialises integer
    arguments on being a multiple of 16 and on being 1, and kernels that split rows across the
    multiprocessors (Liger's RMSNorm backward) pass ceil(tokens / sms) too: so a multiple of 16 whose share
    per multiprocessor is a multiple of 16 as well, one whose share is not, one whose share is a single row
    (a short text-only micro-batch), and each minus one token; then a few tokens (a text-only micro-batch
    that short still occurs), which the fused LoRA kernels' gradient runs unsplit, while the larger counts
    take the split variants."""
    a = 16 * sms
    b = 16 * math.ceil(13 * sms / 16)
    c = 16 * max(1, sms // 16)  # at most one row per multiprocessor: Triton specialises a share of 1 too
    # and a micro-batch within one row block of the fused LoRA kernels (their gradient's unsplit variant)
    return (a, a - 1, b, b - 1, c, c - 1, 15)


def warm_up_kernels(decoder, tokens: tuple[int, ...] | None = None) -> bool:
    """Run one decoder layer of `decoder` (a transformers decoder model on a GPU: `.layers`, `.rotary_emb`)
    forward and backward on random inputs of each of `tokens` tokens (default: `warm_up_token_counts`), so that the JIT-compiled kernels it
    uses (Triton: the fused LoRA layers, Liger) are compiled for the variants a run meets at random before
    the first step, not in the middle of training (a stall of 0.1-0.5 s per new variant). Every layer has
    the same shapes, so one is enough. It runs under the autocast of a training step (`memory.training_autocast`):
    without it, float32 adapters on a 16-bit base take PEFT's forward, not the fused LoRA kernels. The random
    number generators, the layer's mode and every gradient are left as they were; returns False (nothing
    done) off a GPU."""
    param = next(decoder.parameters())
    if param.device.type != "cuda":
        return False
    from .memory import layer_inputs, training_autocast

    if tokens is None:
        tokens = warm_up_token_counts(torch.cuda.get_device_properties(param.device).multi_processor_count)
    layer = decoder.layers[0]
    was_training, was_ckpt = layer.training, getattr(layer, "gradient_checkpointing", False)
    layer.gradient_checkpointing = False
    layer.train()
    try:
        with torch.random.fork_rng(devices=[param.device]), training_autocast(param):  # a step's path
            for n in tokens:
                x, kwargs = layer_inputs(decoder, n, param.dtype, param.device, requires_grad=True)
                out = layer(x, attention_mask=None, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                torch.autograd.grad(out, x, grad_outputs=torch.ones_like(out))  # .grad of no parameter changes
                del x, out, kwargs
        torch.cuda.synchronize(param.device)
    finally:
        layer.gradient_checkpointing = was_ckpt
        layer.train(was_training)
    return True
