"""Train LoRA adapters on an InternVL checkpoint.

    internvl-lora train CONFIG.yaml [section.key=value ...]
    torchrun --nproc_per_node 2 -m internvl_lora.cli train CONFIG.yaml      # DDP
    torchrun --nproc_per_node 2 -m internvl_lora.cli train CONFIG.yaml train.deepspeed=configs/deepspeed/zero1.json
    internvl-lora train CONFIG.yaml train.resume=true                      # continue after an interruption

Steps: validate the config, audit the data (refuse on errors unless data.skip_invalid), load the
model, apply the per-part policy, train with the HF Trainer, save adapter-only checkpoints and the
final adapter folder `OUTPUT/adapter`, which describes itself (base path, template, tiling settings,
policy) so merge, chat and validate need only that path. docs/training.md describes the output folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_pt_utils import get_length_grouped_indices

from .callbacks import (
    GenerationEval, LogLine, LossCurve, StepStats, TrainingHealthError, Watchdog, generation_samples,
)
from .config import RunConfig, save_config
from .data.audit import audit, format_report
from .data.batching import TokenBudgetBatchSampler
from .data.dataset import PadCollator, SupervisedDataset
from .fast import (
    HOST_SIDE_KEYS, HostSide, PackedCollator, apply_liger, checkpoint_some_layers, chunk_output_layer,
    compile_layers, loss_weights, register_varlen_attention, trained_positions_loss,
)
from .data.encode import EncodeSettings
from .data.records import load_meta
from .errors import UserError
from .internvl.checkpoint import CheckpointInfo, inspect_checkpoint, load_model, load_tokenizer
from .lora.fused import fuse_lora_layers, fuse_swiglu_mlps
from .lora.policy import MUTATING_INITS, apply_policy, format_table, is_peft, save_initial_adapter, trainable_table

__all__ = ["train", "TrainingHealthError", "CheckpointSaveError", "InternVLTrainer", "last_complete_checkpoint"]

RUN_META = "internvl_lora.json"
INIT_ADAPTER = "adapter_init"  # PiSSA / OLoRA: the adapter as initialised (for the conversion on save)
CHECKPOINT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors",
                      "model.safetensors.index.json", "pytorch_model.bin")


class CheckpointSaveError(UserError):
    """Writing a checkpoint or the final adapter failed (disk full, permissions, ...)."""


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def print0(*args) -> None:
    if is_main():
        print(*args, flush=True)


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def encode_settings(cfg: RunConfig, info: CheckpointInfo) -> EncodeSettings:
    d = cfg.data
    return EncodeSettings.from_checkpoint(
        info, template=cfg.model.template, max_length=d.max_length, max_dynamic_patch=d.max_dynamic_patch,
        truncation=d.truncation, max_image_pixels=d.max_image_pixels, video_sample=d.video_sample,
        min_num_frames=d.min_num_frames, max_num_frames=d.max_num_frames, jpeg_draft=d.jpeg_draft,
    )


def fingerprint(paths: list[str]) -> str:
    """sha256 over the annotation files' bytes (images are not hashed)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def environment() -> dict:
    """Library versions and hardware, for the run record."""
    import accelerate
    import peft
    import transformers

    from . import __version__

    env = {
        "internvl_lora": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__,
        "deepspeed": _version("deepspeed"), "platform": platform.platform(), "world_size": world_size(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return {k: v for k, v in env.items() if v is not None}


def run_metadata(cfg: RunConfig, info: CheckpointInfo, settings: EncodeSettings, data_fp: dict) -> dict:
    return {
        "base_model": str(Path(cfg.model.path).resolve()),
        "base_format": info.format,
        "template": settings.template.name,
        "encode": {k: getattr(settings, k) for k in (
            "tile_size", "tokens_per_tile", "max_dynamic_patch", "min_dynamic_patch", "use_thumbnail",
            "dynamic_image_size", "normalize_type", "max_length")},
        "policy": cfg.to_dict()["policy"],
        "dataset_fingerprint": data_fp["train"],
        "data": data_fp,
        "versions": environment(),
        "command": " ".join(sys.argv),
    }


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def is_complete_checkpoint(folder: Path) -> bool:
    """A checkpoint is complete once trainer_state.json (written last by the Trainer) is readable and the
    weights are there; a folder cut short by a kill or a full disk is not."""
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any((folder / name).exists() for name in CHECKPOINT_WEIGHTS) or any(folder.glob("global_step*"))


def checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders of a run folder, by step."""
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        name = p.name
        if p.is_dir() and name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
            found.append((int(name[len("checkpoint-"):]), p))
    return [p for _, p in sorted(found)]


def last_complete_checkpoint(out: Path) -> Path | None:
    done = [p for p in checkpoints(out) if is_complete_checkpoint(p)]
    return done[-1] if done else None


def find_resume_checkpoint(out: Path) -> Path | None:
    """The last complete checkpoint; incomplete ones after it (interrupted saves) are reported and removed."""
    last = last_complete_checkpoint(out)
    for p in checkpoints(out):
        if not is_complete_checkpoint(p) and (last is None or int(p.name.split("-")[1]) > int(last.name.split("-")[1])):
            print0(f"{p} is incomplete (interrupted while saving); ignoring it")
            if is_main():
                shutil.rmtree(p, ignore_errors=True)
    return last


def check_resume_compatible(out: Path, cfg: RunConfig) -> None:
    """The policy decides which parameters exist: a checkpoint of another policy cannot be resumed."""
    saved = out / "config.yaml"
    if not saved.exists():
        return
    try:
        old = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError):
        return
    new = cfg.to_dict()
    keys = ("vision", "projector", "llm", "r", "llm_targets", "vision_targets", "use_dora", "init")
    old_policy = old.get("policy") or {} if isinstance(old, dict) else {}
    diff = [k for k in keys if k in old_policy and old_policy[k] != new["policy"][k]]
    if diff:
        raise UserError(
            f"cannot resume {out}: the checkpoints were trained with a different policy ("
            + ", ".join(f"policy.{k}: {old_policy[k]!r} -> {new['policy'][k]!r}" for k in diff)
            + "); use the original settings or a new train.output_dir")
    for section, key in (("train", "per_device_batch_size"), ("train", "grad_accum"), ("train", "seed"),
                         ("data", "max_tokens_per_batch")):
        before = (old.get(section) or {}).get(key) if isinstance(old, dict) else None
        if before is not None and before != new[section][key]:
            print0(f"warning: {section}.{key} changed from {before} to {new[section][key]} since the checkpoint; "
                   "the data position and order after resuming will not match the interrupted run")


# ---------------------------------------------------------------------------------------------------
# Data


class GroupedSampler(Sampler):
    """Length-grouped random order that depends only on (seed, epoch), never on the global RNG.

    Megabatches are built from the global batch (per-device batch x grad accumulation x world size),
    so one process with batch 2B and two processes with batch B see the same samples in each step,
    and a resumed run sees the same order as the interrupted one.
    """

    def __init__(self, lengths: list[int], global_batch: int, seed: int):
        self.lengths, self.global_batch, self.seed = lengths, global_batch, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.global_batch, generator=g))


class _CheckpointShare(TrainerCallback):
    """`train.checkpoint_layers` < 1: after the Trainer turned checkpointing on, keep it on a share of the
    LLM's decoder layers only (the others keep their activations: faster, more memory)."""

    def __init__(self, model, share: float):
        self.model, self.share = model, share

    def on_train_begin(self, args, state, control, **kw):
        if args.activation_checkpointing and self.share < 1:
            layers = decoder_layers(self.model)
            chosen = checkpoint_some_layers(layers, self.share)
            print0(f"activation checkpointing on {len(chosen)} of {len(layers)} LLM decoder layers "
                   f"(train.checkpoint_layers={self.share})")


class _SamplerEpoch(TrainerCallback):
    """Sets the sampler's epoch before each epoch (also when resuming inside an epoch)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kw):
        sampler = getattr(self.trainer, "_grouped_sampler", None)
        if sampler is not None:
            sampler.set_epoch(int(state.epoch + 1e-9) if state.epoch else 0)


def prepare_data(cfg: RunConfig, tokenizer, settings: EncodeSettings, meta: str, train: bool):
    specs = load_meta(meta)
    result = audit(specs, tokenizer, settings)
    print0(format_report(result))
    if result.problems:
        if not cfg.data.skip_invalid:
            raise UserError(
                f"the data audit of {meta} found {len(result.problems)} bad sample(s) (listed above); fix them, "
                "or set data.skip_invalid=true to train on the valid ones (they are counted and logged)")
        print0(f"skipping {len(result.problems)} invalid sample(s) (data.skip_invalid=true)")
    if not result.valid:
        raise UserError(f"{meta}: no valid sample to train on")
    return SupervisedDataset(result, tokenizer, settings, train=train, seed=cfg.train.seed), result, specs


def split_heldout(ds: SupervisedDataset, fraction: float, seed: int) -> tuple[SupervisedDataset, SupervisedDataset]:
    """Hold out a deterministic fraction of the distinct samples (repeats of one line stay on one side)."""
    import copy

    distinct = sorted({ln.index for ln in ds.lines})
    k = max(1, round(fraction * len(distinct)))
    if k >= len(distinct):
        raise UserError(f"data.eval_fraction {fraction} leaves no training sample ({len(distinct)} samples)")
    held = set(random.Random(seed).sample(distinct, k))
    train_ds, eval_ds = copy.copy(ds), copy.copy(ds)
    keep = [i for i, ln in enumerate(ds.lines) if ln.index not in held]
    train_ds.lines = [ds.lines[i] for i in keep]
    train_ds.lengths = [ds.lengths[i] for i in keep]
    seen, ev = set(), []
    for i, ln in enumerate(ds.lines):
        if ln.index in held and ln.index not in seen:
            seen.add(ln.index)
            ev.append(i)
    eval_ds.lines = [ds.lines[i] for i in ev]
    eval_ds.lengths = [ds.lengths[i] for i in ev]
    eval_ds.train = False
    return train_ds, eval_ds


# ---------------------------------------------------------------------------------------------------
# Trainer


class InternVLTrainer(Trainer):
    """The HF Trainer with a few additions:

    - counters for the log line and the watchdog (tokens, trained tokens, tiles, per-step losses);
    - the KV cache forced off (a cache would also defeat packed attention);
    - length grouping from the audit's lengths, seeded per epoch (`GroupedSampler`), or micro-batches
      filled to a token budget (`TokenBudgetBatchSampler`, `get_train_dataloader`);
    - checkpoint writes that fail leave no half-written folder and raise `CheckpointSaveError`.

    Text-only micro-batches are given a blank tile by the collator (`data_collator(..., dummy_vision)`),
    not here: the vision tower then runs inside the model's forward, before the LLM, on every rank.
    """

    def __init__(self, *args, stats: StepStats, lengths: list[int] | None = None, fast_loss: bool = False,
                 loss_reduction: str = "token", token_budget: int = 0, **kw):
        super().__init__(*args, **kw)
        if self.data_collator is not None and not isinstance(self.data_collator, HostSide):
            self.data_collator = HostSide(self.data_collator)  # counts and trained positions, on the host
        self.stats, self.lengths, self.loss_reduction = stats, lengths, loss_reduction
        self.token_budget = token_budget  # > 0: micro-batches of up to this many tokens (`get_train_dataloader`)
        self.fast_loss = fast_loss or loss_reduction != "token"
        self._grouped_sampler = None
        self.add_callback(_SamplerEpoch(self))

    # -- loss ---------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        if training:
            self.stats.add(inputs)
        if not (training and self.fast_loss):  # what HostSide added is not for the model
            inputs = {k: v for k, v in inputs.items() if k not in HOST_SIDE_KEYS}
        if training and self.fast_loss:  # logits only where a label is trained (fast.trained_positions_loss)
            loss, outputs = trained_positions_loss(model, inputs, num_items_in_batch, self.loss_reduction), None
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as the stock loss path does for a global count
        else:
            loss, outputs = super().compute_loss(model, {**inputs, "use_cache": False}, True, num_items_in_batch)
        if training:
            self.stats.add_loss(loss)
        return (loss, outputs) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """With a weighted loss (`sample` / `square`), the normaliser is the sum of the weights over the
        global batch (micro-batches of the step x processes) instead of the number of trained tokens."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.loss_reduction == "token" or not batches or "labels" not in batches[0]:
            return batches, num_items
        total = sum(loss_weights(b["labels"], b.get("cu_seq_lens_q"), self.loss_reduction).sum() for b in batches)
        total = torch.as_tensor(total, dtype=torch.float32, device=device).reshape(1)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total)
        return batches, total.sum()

    # -- data ---------------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy == "group_by_length" and self.lengths:
            global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * max(
                1, self.args.world_size)
            self._grouped_sampler = GroupedSampler(self.lengths, global_batch, self.args.data_seed or self.args.seed)
            return self._grouped_sampler
        return super()._get_train_sampler(train_dataset)

    def get_train_dataloader(self):
        """With `token_budget` (data.max_tokens_per_batch): micro-batches of up to that many tokens from
        `TokenBudgetBatchSampler`, instead of per_device_batch_size samples. The sampler already gives each
        rank its own micro-batches (the same number on every rank), so accelerate's re-sharding of a batch
        sampler is made a passthrough, as the Trainer does for its own rank-aware `BatchRebalanceSampler`;
        accelerate's loader still moves batches to the device and calls the dataset's `set_epoch`."""
        if not self.token_budget:
            return super().get_train_dataloader()
        from functools import partial

        from torch.utils.data import DataLoader
        from transformers.trainer_utils import seed_worker

        if self.lengths is None:
            raise ValueError("a token budget needs the samples' lengths (InternVLTrainer(lengths=...))")
        a = self.args
        inner = self.data_collator
        while hasattr(inner, "inner"):  # under a BlankTileCollator (or another wrapper)
            inner = inner.inner
        padded = not isinstance(inner, PackedCollator)  # padded rows: a micro-batch costs samples x longest
        sampler = TokenBudgetBatchSampler(self.lengths, self.token_budget, a.data_seed or a.seed,
                                          num_replicas=max(1, a.world_size), rank=a.process_index, padded=padded)
        self._grouped_sampler = sampler  # its epoch is set by _SamplerEpoch
        print0(f"micro-batches of up to {self.token_budget} tokens ("
               f"{'samples x longest, padded' if padded else 'summed lengths, packed'}): {len(sampler)} per epoch "
               f"and process (data.max_tokens_per_batch; train.per_device_batch_size is not used)")
        loader = DataLoader(
            self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
            num_workers=a.dataloader_num_workers, pin_memory=a.dataloader_pin_memory,
            persistent_workers=a.dataloader_persistent_workers and a.dataloader_num_workers > 0,
            prefetch_factor=a.dataloader_prefetch_factor if a.dataloader_num_workers > 0 else None,
            multiprocessing_context=a.dataloader_multiprocessing_context if a.dataloader_num_workers > 0 else None,
            worker_init_fn=partial(seed_worker, num_workers=a.dataloader_num_workers, rank=a.process_index))
        loader = self.accelerator.prepare(loader)
        shard = getattr(loader, "batch_sampler", None)  # accelerate's BatchSamplerShard around ours (> 1 process)
        if shard is not None and getattr(shard, "batch_sampler", None) is sampler:
            shard.num_processes, shard.process_index = 1, 0
        return loader

    # -- logging ------------------------------------------------------------------------------------
    def log(self, logs: dict, start_time: float | None = None) -> None:
        self.stats.sync()  # every rank logs at the same steps (the loss was just gathered)
        super().log(logs, start_time)

    # -- checkpoints --------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"checkpoint-{self.state.global_step}"
        previous = last_complete_checkpoint(run_dir)
        try:
            super()._save_checkpoint(model, trial)
        except OSError as e:
            removed = False
            if self.args.should_save and folder.exists() and not is_complete_checkpoint(folder):
                shutil.rmtree(folder, ignore_errors=True)
                removed = True
            kept = f"the previous checkpoint {previous} is intact" if previous and previous != folder else \
                "no earlier checkpoint exists"
            raise CheckpointSaveError(
                f"could not write checkpoint {folder} at step {self.state.global_step}: "
                f"{e.strerror or e}{f' ({e.filename})' if getattr(e, 'filename', None) else ''}. "
                + ("The half-written folder was removed and " if removed else "")
                + f"{kept[0].upper() + kept[1:] if not removed else kept}. Free disk space (or fix permissions) "
                "and run the same command with train.resume=true to continue from the last checkpoint") from None


def zero_stage(deepspeed_config: str | None) -> int:
    """The ZeRO stage of a DeepSpeed JSON config (0 without one)."""
    if not deepspeed_config:
        return 0
    return int(json.loads(Path(deepspeed_config).read_text()).get("zero_optimization", {}).get("stage", 0))


def data_collator(tokenizer, settings: EncodeSettings, dummy_vision: bool, packing: bool = False):
    """Right-padding collator; with `dummy_vision`, a batch without images gets one blank tile and a
    masked, label-free block of image tokens after its last token (`data.blank_tile`), like the official
    white dummy tile: the loss is unchanged, and every rank runs embed -> vision -> LLM in the same order
    (so ZeRO-3 / FSDP gathers match across ranks and a trainable vision part always gets a gradient)."""
    collator = PackedCollator() if packing else PadCollator(tokenizer.pad_token_id)
    if not dummy_vision:
        return collator
    from .data.blank_tile import BlankTileCollator
    from .internvl.constants import IMG_CONTEXT_TOKEN

    return BlankTileCollator(collator, tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN), settings.tokens_per_tile,
                             settings.tile_size)


# ---------------------------------------------------------------------------------------------------


def training_arguments(cfg: RunConfig, out: Path, dtype: torch.dtype, has_eval: bool) -> TrainingArguments:
    t = cfg.train
    use_bf16 = dtype == torch.bfloat16
    ckpt = t.gradient_checkpointing
    fsdp_config = t.fsdp_config
    if isinstance(fsdp_config, str):
        fsdp_config = json.loads(Path(fsdp_config).read_text()) if fsdp_config.endswith(".json") else \
            yaml.safe_load(Path(fsdp_config).read_text())
    return TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.per_device_batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay, num_train_epochs=t.epochs, max_steps=t.max_steps, max_grad_norm=t.max_grad_norm,
        bf16=use_bf16, fp16=dtype == torch.float16, activation_checkpointing=ckpt,
        # ZeRO-3 releases partitioned weights between forward and recomputation, which non-reentrant
        # checkpointing rejects ("Recomputed values ... have different metadata", seen on 2 H200s).
        activation_checkpointing_kwargs={"use_reentrant": zero_stage(t.deepspeed) == 3} if ckpt else None,
        seed=t.seed, data_seed=t.seed, logging_steps=t.logging_steps, logging_nan_inf_filter=False,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit or None,
        eval_strategy="steps" if has_eval and t.eval_steps > 0 else "no",
        eval_steps=t.eval_steps if t.eval_steps > 0 else None, prediction_loss_only=True,
        deepspeed=t.deepspeed, fsdp=bool(t.fsdp) or None, fsdp_config=fsdp_config if t.fsdp else None,
        report_to=list(t.report_to) or "none",
        dataloader_num_workers=cfg.data.num_workers, dataloader_pin_memory=torch.cuda.is_available(),
        # Pinned batches copied without blocking: a blocking copy would make the host wait for all the GPU
        # work queued before it (the previous step) before it could queue the next.
        accelerator_config={"non_blocking": torch.cuda.is_available()},
        remove_unused_columns=False, disable_tqdm=True,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        ddp_find_unused_parameters=False,
        # torchrun on a machine without a GPU: DDP over gloo (accelerate only does CPU DDP when asked to).
        **({"use_cpu": True, "ddp_backend": "gloo"}
           if world_size() > 1 and not torch.cuda.is_available() and not t.deepspeed else {}),
    )


def decoder_layers(model):
    """The decoder layers of the model's language model (through a PEFT wrapper)."""
    base = model.get_base_model() if is_peft(model) else model
    return base.get_decoder().layers


def _lora_kernels_available() -> bool:
    from .lora.kernels import available

    return available()


def speed_options(model, t, before_adapters: bool) -> list[str]:
    """Apply the speed options of the `train` section; called before and after the adapters are injected.

    Before: Liger kernels on the language model. After: on a GPU, SDPA without its cuDNN backend; the
    fused LoRA layers (`fast.fuse_lora_layers`, their dropout in Triton kernels with `lora_kernels`) and
    SwiGLU MLPs (`fast.fuse_swiglu_mlps`, with `fused_mlp`), or torch.compile of each decoder layer
    (which then handles dropout itself); the chunked loss (`fast.chunk_output_layer`). Returns what was
    done.
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
    sharded = zero_stage(t.deepspeed) == 3 or bool(t.fsdp)
    if t.compile:
        done.append(f"torch.compile of {compile_layers(decoder_layers(model))} decoder layers")
    elif t.fused_lora and is_peft(model):
        if sharded:
            # Sharded weights are gathered and released around each module; the fused path has only
            # been run unsharded (1 GPU, DDP, ZeRO-1), so sharded runs keep PEFT's own path.
            done.append("fused LoRA layers off under ZeRO-3 / FSDP (PEFT's path)")
        else:
            done.append(f"fused LoRA layers: {fuse_lora_layers(model, kernels=t.lora_kernels)}"
                        + (" (dropout in Triton kernels on the GPU)" if t.lora_kernels and _lora_kernels_available() else ""))
            if t.fused_mlp:
                done.append(f"fused SwiGLU MLPs: {fuse_swiglu_mlps(model)}")
    if t.chunked_loss:
        if sharded:  # the output layer's weight is whole only inside its own forward there
            done.append("chunked loss off under ZeRO-3 / FSDP")
        elif chunk_output_layer(model):
            done.append("chunked loss")
    return done


def save_final(trainer: InternVLTrainer, out: Path, init_dir: Path | None) -> Path:
    """Write OUT/adapter atomically (into a temporary folder, then renamed)."""
    final, tmp = out / "adapter", out / ".adapter.partial"
    try:
        if is_main() and tmp.exists():
            shutil.rmtree(tmp)
        if init_dir is not None:
            # PiSSA / OLoRA: a plain rank-2r LoRA that applies to the original base weights.
            if is_main():
                trainer.accelerator.unwrap_model(trainer.model).save_pretrained(
                    str(tmp), path_initial_model_for_weight_conversion=str(init_dir))
        else:
            trainer.save_model(str(tmp))
        if is_main():
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except OSError as e:
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        last = last_complete_checkpoint(out)
        raise CheckpointSaveError(
            f"could not write the final adapter to {final}: {e.strerror or e}. "
            + (f"The last checkpoint {last} is intact: free disk space and run the same command with "
               "train.resume=true to write the adapter from it" if last else "No checkpoint was kept")) from None
    return final


_TENSORBOARD_DIR_SET: str | None = None


def _set_tensorboard_dir(path: Path) -> None:
    """OUT/tensorboard, unless the user set TENSORBOARD_LOGGING_DIR (one we set for an earlier run is replaced)."""
    global _TENSORBOARD_DIR_SET
    current = os.environ.get("TENSORBOARD_LOGGING_DIR")
    if current is None or current == _TENSORBOARD_DIR_SET:
        os.environ["TENSORBOARD_LOGGING_DIR"] = _TENSORBOARD_DIR_SET = str(path)


def train(cfg: RunConfig) -> Path:
    t_start = time.time()
    t = cfg.train
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume = None
    if t.resume:
        resume = find_resume_checkpoint(out)
        if resume:
            check_resume_compatible(out, cfg)
        print0(f"resuming from {resume}" if resume else f"no complete checkpoint in {out} to resume from; starting fresh")
    elif checkpoints(out):
        print0(f"warning: {out} already holds {len(checkpoints(out))} checkpoint(s) of an earlier run; they may be "
               "rotated away. To continue that run instead, add train.resume=true")
    if is_main():
        save_config(cfg, out / "config.yaml")

    info = inspect_checkpoint(cfg.model.path)
    tokenizer = load_tokenizer(cfg.model.path)
    settings = encode_settings(cfg, info)
    print0(f"checkpoint {cfg.model.path}: format {info.format}, template {settings.template.name}, "
           f"tile {settings.tile_size}px x {settings.tokens_per_tile} tokens, max {settings.max_dynamic_patch} tiles")
    train_ds, _, specs = prepare_data(cfg, tokenizer, settings, cfg.data.meta, train=True)
    eval_ds, eval_specs = None, []
    if cfg.data.eval_meta:
        eval_ds, _, eval_specs = prepare_data(cfg, tokenizer, settings, cfg.data.eval_meta, train=False)
    elif cfg.data.eval_fraction > 0:
        train_ds, eval_ds = split_heldout(train_ds, cfg.data.eval_fraction, t.seed)
        print0(f"held out {len(eval_ds)} of {len(eval_ds) + len({ln.index for ln in train_ds.lines})} samples "
               f"(data.eval_fraction={cfg.data.eval_fraction}) for evaluation")
    data_fp = {"train": fingerprint([s.annotation for s in specs]), "train_samples": len(train_ds)}
    if eval_ds is not None:
        data_fp["eval_samples"] = len(eval_ds)
        if eval_specs:
            data_fp["eval"] = fingerprint([s.annotation for s in eval_specs])

    dtype = resolve_dtype(cfg.model.dtype)
    if cfg.policy.init in MUTATING_INITS and zero_stage(t.deepspeed) == 3:
        raise UserError(f"policy.init={cfg.policy.init} is not supported with DeepSpeed ZeRO-3 (the adapter "
                        "conversion needs whole weights); use ZeRO-1/2, DDP or policy.init=default")
    # TrainingArguments before the model: with ZeRO-3 the weights are then partitioned while loading.
    args = training_arguments(cfg, out, dtype, eval_ds is not None)
    _set_tensorboard_dir(out / "tensorboard")

    from transformers import set_seed

    set_seed(t.seed)  # LoRA init (and PiSSA's randomised SVD) reproducible
    model = load_model(cfg.model.path, dtype=dtype)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    model.set_attn_implementation(cfg.model.attn_implementation)
    if cfg.data.packing:  # attention within each packed sample (torch varlen on a GPU)
        model.set_attn_implementation({"text_config": register_varlen_attention()})
        print0(f"attention: LLM per packed sample (data.packing; unpacked batches such as generation use SDPA), "
               f"vision tower {cfg.model.attn_implementation}")
    speed = speed_options(model, t, before_adapters=True)
    model = apply_policy(model, cfg.policy, info.llm_type)
    speed += speed_options(model, t, before_adapters=False)
    if speed:
        print0("speed options: " + "; ".join(speed))
    init_dir = None
    if cfg.policy.init in MUTATING_INITS and is_peft(model):
        init_dir = out / INIT_ADAPTER
        if is_main() and not (resume and (init_dir / "adapter_config.json").exists()):
            save_initial_adapter(model, init_dir)
    table = trainable_table(model, cfg.policy)
    print0(format_table(table, cfg.policy))
    meta = run_metadata(cfg, info, settings, data_fp)
    meta["trainable"] = table
    if is_main():
        (out / RUN_META).write_text(json.dumps(meta, indent=2) + "\n")
        (out / "trainable_params.json").write_text(json.dumps(table, indent=2) + "\n")

    stats = StepStats()
    resume_step = json.loads((resume / "trainer_state.json").read_text())["global_step"] if resume else None
    log = LogLine(stats, out, print_fn=print0, resume_step=resume_step, is_main=is_main())
    callbacks: list = [log, LossCurve(log, out)]
    watchdog = None
    if t.watchdog:
        # float16 loss scaling skips the first optimizer steps (overflow): give the adapters longer to move.
        lora_check = t.watchdog_lora_steps + (40 if dtype == torch.float16 else 0)
        watchdog = Watchdog(stats, model, lora_check_step=lora_check, max_grad_norm_alarm=t.watchdog_grad_norm)
        callbacks.append(watchdog)
    gen_eval = None
    if t.generate_steps and eval_ds is not None:
        gen_eval = GenerationEval(generation_samples(eval_ds.lines, t.generate_samples), tokenizer, settings,
                                  t.generate_steps, t.generate_max_new_tokens, t.eval_batch_size or t.per_device_batch_size)
        gen_eval.watchdog = watchdog
        callbacks.append(gen_eval)
    dummy = t.dummy_vision == "always" or (t.dummy_vision == "auto" and world_size() > 1)
    trainer = InternVLTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=data_collator(tokenizer, settings, dummy, cfg.data.packing), callbacks=callbacks,
        stats=stats, lengths=train_ds.lengths, fast_loss=cfg.data.packing, loss_reduction=t.loss_reduction,
        token_budget=cfg.data.max_tokens_per_batch,
    )
    if t.gradient_checkpointing and t.checkpoint_layers < 1:
        trainer.add_callback(_CheckpointShare(model, t.checkpoint_layers))
    trainer.remove_callback(PrinterCallback)  # the LogLine prints instead of raw dicts
    if t.fsdp and not trainer.is_fsdp_enabled:
        print0("warning: train.fsdp is set, but accelerate enables FSDP on GPUs only: this run uses DDP")
    if gen_eval is not None:
        gen_eval.trainer = trainer

    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if watchdog and watchdog.diagnosis:
        if is_main():
            log.write({"step": trainer.state.global_step, "watchdog": watchdog.diagnosis})
        raise TrainingHealthError(f"training stopped by the loss-health watchdog: {watchdog.diagnosis}")
    evaluated_last = any("eval_loss" in r and r.get("step") == trainer.state.global_step
                         for r in trainer.state.log_history)
    if eval_ds is not None and not evaluated_last:
        trainer.evaluate()  # logged through LogLine (metrics.jsonl, tensorboard)

    adapter_dir = save_final(trainer, out, init_dir)
    if is_main():
        tokenizer.save_pretrained(adapter_dir)
        for name in ("preprocessor_config.json", "generation_config.json"):
            if (Path(cfg.model.path) / name).exists():
                (adapter_dir / name).write_bytes((Path(cfg.model.path) / name).read_bytes())
        meta["train_seconds"] = round(time.time() - t_start, 1)
        meta["global_step"] = trainer.state.global_step
        meta["final_loss"] = next((r["loss"] for r in reversed(log.history) if "loss" in r), None)
        final_eval = next((r for r in reversed(log.history) if "eval_loss" in r), None)
        if final_eval:
            meta["final_eval_loss"] = final_eval["eval_loss"]
        if gen_eval is not None and gen_eval.results:
            meta["final_generation_eval"] = gen_eval.results[-1]
        (adapter_dir / RUN_META).write_text(json.dumps(meta, indent=2) + "\n")
        save_config(cfg, adapter_dir / "config.yaml")
        LossCurve(log, out).on_save(args, trainer.state, trainer.control)
        print0(f"adapter saved to {adapter_dir}")
    return adapter_dir
