"""The HF Trainer as this project uses it: `InternVLTrainer`, its samplers and callbacks, and the
`TrainingArguments` built from a run config (`training_arguments`)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import yaml
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import get_length_grouped_indices

from ..data.batching import TokenBudgetBatchSampler
from ..data.collate import HOST_SIDE_KEYS, HostSide
from ..data.dataset import LOAD_ERROR
from ..distributed import print0, world_size
from ..errors import CheckpointSaveError
from ..run_dir import is_complete_checkpoint, last_complete_checkpoint, write_failure
from .callbacks import StepStats
from .loss import loss_weights, trained_positions_loss
from .speed import checkpoint_some_layers, decoder_layers, language_decoder, warm_up_kernels


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
    """`train.checkpoint_layers` < 1 or `auto`: after the Trainer turned checkpointing on, keep it on a share
    of the LLM's decoder layers only (the others keep their activations: faster, more memory). `auto`:
    the share planned from the GPU's free memory for micro-batches of up to `tokens` tokens
    (`memory.plan_for_model`); every layer off a GPU."""

    def __init__(self, model, share: float | str, tokens: int = 0):
        self.model, self.share, self.tokens = model, share, tokens
        self.plan = None

    def on_train_begin(self, args, state, control, **kw):
        if not args.activation_checkpointing:
            return
        layers = decoder_layers(self.model)
        share = self.share
        if share == "auto":
            from .memory import plan_for_model

            trainable = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
            self.plan = plan_for_model(language_decoder(self.model), self.tokens, trainable) if self.tokens else None
            if self.plan is None:
                return  # not on a GPU: every layer stays recomputed
            share = self.plan.share
            print0(self.plan.describe())
            if not self.plan.fits:
                print0(f"warning: even with every layer recomputed, micro-batches of {self.tokens:,} tokens may not "
                       "fit this GPU's free memory; if it runs out, lower data.max_length or "
                       "data.max_tokens_per_batch, or use more GPUs with train.fsdp / DeepSpeed ZeRO-3")
        if share < 1:
            chosen = checkpoint_some_layers(layers, share)
            if self.share != "auto":
                print0(f"activation checkpointing on {len(chosen)} of {len(layers)} LLM decoder layers "
                       f"(train.checkpoint_layers={self.share})")


class _KernelWarmUp(TrainerCallback):
    """Before the first step: compile the LLM decoder layer's JIT kernels for the variants a run meets at
    random (`speed.warm_up_kernels`), so no step in the middle of training waits for a compiler."""

    def __init__(self, model):
        self.model = model

    def on_train_begin(self, args, state, control, **kw):
        warm_up_kernels(language_decoder(self.model))


class _SamplerEpoch(TrainerCallback):
    """Sets the sampler's epoch before each epoch (also when resuming inside an epoch)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kw):
        sampler = getattr(self.trainer, "_grouped_sampler", None)
        if sampler is not None:
            sampler.set_epoch(int(state.epoch + 1e-9) if state.epoch else 0)


def _raising_load_errors(batches):
    """The batches of a loader, raising the error of a sample that failed in a loader worker (dataset.py)
    as it comes, with its own message (before the Trainer looks for the batch's labels)."""
    for batch in batches:
        if isinstance(batch, dict) and LOAD_ERROR in batch:
            raise batch[LOAD_ERROR]
        yield batch


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
                 loss_reduction: str = "token", token_budget: int = 0, preference=None, measure=None, **kw):
        super().__init__(*args, **kw)
        self.preference = preference  # a `preference.PreferenceObjective` for train.objective=mpo
        self.measure = measure  # (logs, state) -> figures added to a logged record (`LogLine.measure`)
        if self.data_collator is not None and not isinstance(self.data_collator, HostSide):
            self.data_collator = HostSide(self.data_collator)  # counts and trained positions, on the host
        self.stats, self.lengths, self.loss_reduction = stats, lengths, loss_reduction
        self.token_budget = token_budget  # > 0: micro-batches of up to this many tokens (`get_train_dataloader`)
        self.fast_loss = fast_loss or loss_reduction != "token"
        self._grouped_sampler = None
        self.add_callback(_SamplerEpoch(self))

    # -- loss ---------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if LOAD_ERROR in inputs:  # a sample failed in a loader worker (evaluation batches come this way)
            raise inputs[LOAD_ERROR]
        training = model.training
        if training:
            self.stats.add(inputs)
        if self.preference is not None:
            return self._preference_loss(model, inputs, return_outputs, num_items_in_batch if training else None)
        if not (training and self.fast_loss):  # what HostSide added is not for the model
            inputs = {k: v for k, v in inputs.items() if k not in HOST_SIDE_KEYS}
        if training and self.fast_loss:  # logits only where a label is trained (loss.trained_positions_loss)
            loss, outputs = trained_positions_loss(model, inputs, num_items_in_batch, self.loss_reduction), None
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as the stock loss path does for a global count
        else:
            loss, outputs = super().compute_loss(model, {**inputs, "use_cache": False}, True, num_items_in_batch)
        if training:
            self.stats.add_loss(loss)
        return (loss, outputs) if return_outputs else loss

    def _preference_loss(self, model, inputs, return_outputs, pairs_in_batch):
        """The MPO loss: per-pair terms summed and divided by the pairs of the global batch."""
        inputs = {k: v for k, v in inputs.items() if k != "batch_counts"}
        loss = self.preference(model, inputs, pairs_in_batch)
        if pairs_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # a global count, as for the SFT loss
        if model.training:
            self.stats.add_loss(loss)
        return (loss, {"loss": loss}) if return_outputs else loss  # a mapping: prediction_step reads no logits

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """With a weighted loss (`sample` / `square`), the normaliser is the sum of the weights over the
        global batch (micro-batches of the step x processes) instead of the number of trained tokens; with
        the preference objective, the number of pairs of the global batch."""
        t = time.perf_counter()  # the loader's next batches: the time the loop waits for them is logged
        batches, num_items = super().get_batch_samples(_raising_load_errors(epoch_iterator), num_batches, device)
        self.stats.data_wait += time.perf_counter() - t
        if self.preference is not None and batches:
            total = sum(b["pairs"] for b in batches)
        elif self.loss_reduction == "token" or not batches or "labels" not in batches[0]:
            return batches, num_items
        else:
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

    def _get_eval_sampler(self, eval_dataset):
        """Length grouping of the evaluation samples from the audit's lengths (the stock sampler would
        encode every sample, images included, to measure it, and cannot measure a preference pair)."""
        lengths = getattr(eval_dataset, "lengths", None)
        if self.args.train_sampling_strategy != "group_by_length" or not lengths or self.args.world_size > 1:
            return super()._get_eval_sampler(eval_dataset)
        from transformers.trainer_pt_utils import LengthGroupedSampler

        return LengthGroupedSampler(self.args.eval_batch_size, lengths=lengths,
                                    generator=torch.Generator().manual_seed(self.args.data_seed or self.args.seed))

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
        padded = not getattr(self.data_collator, "packed", False)  # padded rows: a micro-batch costs samples x longest
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
        if self.preference is not None:  # reward accuracy, margins, log-probs, loss terms of the interval
            if "loss" in logs:
                logs.update(self.preference.pop_metrics("train"))
            elif "eval_loss" in logs:
                logs.update(self.preference.pop_metrics("eval"))
        if self.measure is not None:  # before the callbacks: TensorBoard and the others get the figures too
            logs = {**logs, **self.measure(logs, self.state)}
        super().log(logs, start_time)

    # -- checkpoints --------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"checkpoint-{self.state.global_step}"
        previous = last_complete_checkpoint(run_dir)
        t = time.perf_counter()
        try:
            super()._save_checkpoint(model, trial)
            self.stats.checkpoint += time.perf_counter() - t  # logged with the next record
        except (OSError, RuntimeError) as e:
            reason = write_failure(e)
            if reason is None:
                raise
            removed = False
            if self.args.should_save and folder.exists() and not is_complete_checkpoint(folder):
                shutil.rmtree(folder, ignore_errors=True)
                removed = True
            kept = f"the previous checkpoint {previous} is intact" if previous and previous != folder else \
                "no earlier checkpoint exists"
            raise CheckpointSaveError(
                f"could not write checkpoint {folder} at step {self.state.global_step}: "
                f"{reason}. "
                + ("The half-written folder was removed and " if removed else "")
                + f"{kept[0].upper() + kept[1:] if not removed else kept}. Free disk space (or fix permissions) "
                "and run the same command with train.resume=true to continue from the last checkpoint") from None


def zero_stage(deepspeed_config: str | None) -> int:
    """The ZeRO stage of a DeepSpeed JSON config (0 without one)."""
    if not deepspeed_config:
        return 0
    return int(json.loads(Path(deepspeed_config).read_text()).get("zero_optimization", {}).get("stage", 0))


def sharded_weights(t) -> bool:
    """Whether the `train` section `t` partitions the weights across processes (ZeRO-3, FSDP)."""
    return zero_stage(t.deepspeed) == 3 or bool(t.fsdp)


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



def use_tensorboard_dir(trainer: Trainer, folder: Path) -> None:
    """Point the Trainer's TensorBoard callback (when `report_to` has one) at `folder`, unless the user chose a
    folder with TENSORBOARD_LOGGING_DIR. Set on the callback itself, not through the environment variable it
    reads when it is built, so nothing process-wide changes."""
    if os.environ.get("TENSORBOARD_LOGGING_DIR") is not None:
        return
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback):
            cb.logging_dir = str(folder)
