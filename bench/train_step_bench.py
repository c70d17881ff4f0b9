"""Training-step throughput of our real training path on InternVL3-shaped models (random weights).

    python bench/train_step_bench.py --sizes 1b,8b --modes packed,padded [--steps 10]

What runs: the model built from a real-shaped config (InternViT-300M + Qwen2.5 LLM of InternVL3-1B /
2B / 8B), our LoRA policy (`lora.policy.apply_policy`: r16 on the LLM, vision and projector frozen), our
collators (`data.collate.PackedCollator` or `PadCollator`), our `train.trainer.InternVLTrainer` driven by
`Trainer.train()` with bf16 and AdamW — only the dataset is synthetic (no tokenizer, no images: ids
and random tiles). Samples follow bench/naive_lora_step.py exactly (same RNG, same draws):
1–6 tiles (+ thumbnail when > 1), 16–64 prefix tokens, 16–128 question tokens, 32–512 answer tokens
(the only trained ones), per-device batch 4.

Model FLOPs per step (the naive script's formula, so ratios compare like with like):
  LLM: 4 * N_llm per token (forward 2N + activation gradients 2N; LoRA weights are negligible),
       N_llm = matmul weights incl. lm_head; plus causal attention 3 * 2 * L * d * s^2 per sample;
  ViT (frozen, forward only): tiles * (2 * N_vit * 1025 + 4 * L_v * d_v * 1025^2).
Work we skip (logits of untrained positions, padding) still counts as model FLOPs, as in MFU.
Prints one JSON line per configuration; on a GPU each line also carries the card's dense bf16 matmul rate,
measured once at the start of the process (bench/matmul_rate.py), and the model FLOP rate as a share of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformers import InternVLConfig, InternVLForConditionalGeneration, TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from transformers.trainer_utils import SaveStrategy  # noqa: E402

from internvl_lora.train.callbacks import LogLine, StepStats, Watchdog  # noqa: E402
# The baseline's shapes, sample draws and FLOP formula, imported so both sides use the very same ones.
from naive_lora_step import IMG_TOKEN, LLM, model_flops, samples  # noqa: E402
from internvl_lora.config import DataArgs, PolicyArgs, RunConfig, TrainArgs  # noqa: E402
from internvl_lora.data.batching import TokenBudgetBatchSampler  # noqa: E402
from internvl_lora.data.collate import PackedCollator, PadCollator  # noqa: E402
from internvl_lora.internvl.embed import image_tokens_checked_on_the_gpu  # noqa: E402
from internvl_lora.lora.policy import apply_policy  # noqa: E402
from internvl_lora.train.speed import decoder_layers, fused_paths, register_varlen_attention, speed_options  # noqa: E402
from internvl_lora.train.trainer import InternVLTrainer, _CheckpointShare, training_arguments  # noqa: E402

VIT_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=448, patch_size=14)


class Synthetic(torch.utils.data.Dataset):
    def __init__(self, groups, tile):
        self.items = [s for g in groups for s in g]
        self.tile = tile

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ids, labels, patches = self.items[i]
        g = torch.Generator().manual_seed(i)
        item = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if patches:  # a text-only sample (bench/e2e_bench.py's real samples) has no pixel_values, as in training
            item["pixel_values"] = torch.randn(patches, 3, self.tile, self.tile, generator=g)
        return item


class GcPauses:
    """Python's garbage collections while the timed steps run: count and seconds per generation (the
    interpreter stops the host for each; a full collection over a large heap takes milliseconds)."""

    def __init__(self):
        self.on, self.started = False, None
        self.count, self.seconds = [0, 0, 0], [0.0, 0.0, 0.0]

    def __call__(self, phase, info):
        if phase == "start":
            self.started = time.perf_counter()
        elif self.on and self.started is not None:
            self.count[info["generation"]] += 1
            self.seconds[info["generation"]] += time.perf_counter() - self.started

    def summary(self, steps: int) -> dict:
        return dict(gc_collections=self.count, gc_ms_per_step=round(1e3 * sum(self.seconds) / max(1, steps), 2),
                    gc_full_ms=round(1e3 * self.seconds[2], 1))


class Timer(TrainerCallback):
    def __init__(self, warmup, gc_pauses=None):
        self.warmup, self.t0, self.steps, self.gc = warmup, None, 0, gc_pauses

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()
            if self.gc is not None:
                self.gc.on = True

    def on_step_end(self, args, state, control, **kw):
        if state.global_step > self.warmup:
            self.steps += 1


def _finish_profile(prof, out_dir, table_name, trace_name, **table_options) -> str:
    """Stop a torch.profiler run: write its kernel table to OUT_DIR/table_name and its Chrome trace to
    OUT_DIR/trace_name.json.gz; returns the table."""
    import gzip
    import shutil

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof.__exit__(None, None, None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages().table(**table_options)
    (out / table_name).write_text(table)
    raw = out / f"{trace_name}.json"
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as f, gzip.open(out / f"{trace_name}.json.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    raw.unlink()
    return table


class Profile(TrainerCallback):
    """torch.profiler over one step after the warm-up: prints the top CUDA kernels by total time and writes
    the Chrome trace (with Python stacks) to OUT_DIR/trace.json.gz, for the GPU idle-gap analysis of
    bench/trace_gaps.py."""

    def __init__(self, warmup, out_dir):
        self.warmup, self.out_dir, self.prof = warmup, out_dir, None

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.warmup + 1 and self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True)
            self.prof.__enter__()

    def on_step_end(self, args, state, control, **kw):
        if self.prof is not None and state.global_step == self.warmup + 2:
            table = _finish_profile(self.prof, self.out_dir, "profile.txt", "trace", sort_by="cuda_time_total",
                                    row_limit=30, max_name_column_width=70)
            print(table, file=sys.stderr, flush=True)
            self.prof = None


class Phases:
    """Wall time per phase of a training step, each phase ended by a CUDA synchronize (--phases): fetching
    the micro-batches, vision forward, LLM forward (embedding, decoder, head), loss + backward (the rest of
    the training step), and optimizer + Trainer bookkeeping (the rest of the step). The synchronizes remove
    the overlap of host and GPU, so the sum is a bit above the plain step time."""

    def __init__(self):
        self.t = {}
        self.n = 0
        self.mark = None

    def add(self, key, dt):
        self.t[key] = self.t.get(key, 0.0) + dt

    def now(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def hook(self, module, key):
        def pre(*_):
            self.mark = self.now()

        def post(*_):
            self.add(key, self.now() - self.mark)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def summary(self, steps):
        return {k: round(v * 1e3 / max(steps, 1), 1) for k, v in self.t.items()}


def timed_trainer(phases: Phases, timer):
    class TimedTrainer(InternVLTrainer):
        def get_batch_samples(self, *a, **k):
            t = phases.now()
            out = super().get_batch_samples(*a, **k)
            if timer.t0 is not None:
                phases.add("data_ms", phases.now() - t)
            return out

        def training_step(self, *a, **k):
            t = phases.now()
            before = dict(phases.t)
            out = super().training_step(*a, **k)
            dt = phases.now() - t
            if timer.t0 is None:  # warm-up: drop what the hooks added
                phases.t = before
            else:
                inner = sum(phases.t.get(x, 0.0) - before.get(x, 0.0) for x in ("vision_ms", "llm_fwd_ms"))
                phases.add("loss_bwd_ms", dt - inner)
                phases.add("training_step_ms", dt)
            return out

    return TimedTrainer


def run(size, mode, bs, steps, max_tiles, ckpt, liger, out_dir, warmup=3, dropout=0.05, fused=True, compile=False,
        budget=0, profile=False, chunked=True, phases=False, accum=1, timeline=0, sync_debug=False, max_grad_norm=1.0,
        timeline_cpu=False,
        cudnn_sdpa=False, lora_kernels=True, fused_mlp=True, items=None):
    """ckpt: share of the LLM decoder layers recomputed (0 = no activation checkpointing, 1 = all, "auto" =
    planned from the free memory as train.checkpoint_layers=auto).
    items: (ids, labels, tiles) samples to train on instead of the synthetic draws (with a token budget;
    ids in the model's vocabulary, IMG_TOKEN for image tokens): bench/e2e_bench.py's real samples."""
    torch.manual_seed(0)
    vit = VIT_TINY if size == "tiny" else {}
    cfg = InternVLConfig(vision_config=vit, text_config=dict(model_type="qwen2", rope_theta=1e6, max_position_embeddings=32768, **LLM[size]),
                         image_token_id=IMG_TOKEN, tie_word_embeddings=LLM[size]["tie_word_embeddings"])
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):
        model = InternVLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa",
                                                              dtype=torch.bfloat16 if cuda else torch.float32)
    packed = mode.startswith("packed")
    if packed:
        model.set_attn_implementation({"text_config": register_varlen_attention()})
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    # The training command's own setup (train.speed.speed_options); the fused paths one by one (fused_paths),
    # where the run config has one switch (train.fused) for all of them.
    t = TrainArgs(liger=liger, fused=False, checkpoint_layers=ckpt or 1.0)  # ckpt: a share or "auto"
    done = speed_options(model, t, before_adapters=True)
    model = apply_policy(model, PolicyArgs(dropout=dropout), "qwen2")
    done += speed_options(model, t, before_adapters=False)
    if image_tokens_checked_on_the_gpu(model):  # as the training command
        done.append("image tokens checked on the GPU")
    if compile:  # an experiment of the benchmark only: torch.compile each decoder layer (no fused LoRA then)
        layers = decoder_layers(model)
        for layer in layers:
            layer.compile(dynamic=True)
        done.append(f"torch.compile of {len(layers)} decoder layers")
    done += fused_paths(model, lora=fused and not compile, kernels=lora_kernels, mlp=fused_mlp, chunked_loss=chunked)
    if cudnn_sdpa and cuda:  # A/B of the cuDNN attention backend that speed_options turns off
        torch.backends.cuda.enable_cudnn_sdp(True)
        done = [d for d in done if "cuDNN" not in d]
    rng = random.Random(0)
    groups = [items] if items else [samples(bs, rng, max_tiles) for _ in range(steps + warmup)]
    data = Synthetic(groups, cfg.vision_config.image_size[0] if isinstance(cfg.vision_config.image_size, (list, tuple)) else cfg.vision_config.image_size)
    lengths = [len(ids) for ids, _, _ in data.items]
    if budget:  # the same samples, in micro-batches of up to `budget` tokens (what the trainer's sampler yields)
        batches = TokenBudgetBatchSampler(lengths, budget, seed=0, padded=not packed).batches(0)
        usable = len(batches) - len(batches) % accum  # whole optimizer steps only
        timed = [[data.items[i] for i in b] for b in batches[warmup * accum:usable]]
        total_steps = usable // accum
    else:
        if accum != 1 or items:
            raise ValueError("--accum and real samples need a token budget")
        timed, total_steps = groups[warmup:], steps + warmup
    # The training command's own TrainingArguments (train.training_arguments), from the same TrainArgs
    # the recipe uses; only what a benchmark needs differs (fixed step count, no saving or reporting).
    run_cfg = RunConfig(data=DataArgs(num_workers=2 if cuda else 0), train=dataclasses.replace(
        t, per_device_batch_size=bs, grad_accum=accum, lr=4e-5, max_steps=total_steps, seed=0,
        gradient_checkpointing=ckpt == "auto" or ckpt > 0, max_grad_norm=max_grad_norm, logging_steps=10, report_to=[]))
    args = training_arguments(run_cfg, Path(out_dir), torch.bfloat16 if cuda else torch.float32, has_eval=False)
    args.train_sampling_strategy = "sequential"  # the timed samples are known in order (token budgets: ours)
    args.save_strategy = SaveStrategy.NO  # the Trainer would otherwise save at the last step, inside the timing
    stats = StepStats()
    pauses = GcPauses()
    timer = Timer(warmup, pauses)
    # The training command's callbacks: the log line (every 10 steps, to stderr) and the watchdog.
    log = LogLine(stats, Path(out_dir), print_fn=lambda *x: print(*x, file=sys.stderr))
    watchdog = Watchdog(stats, model)
    # traces start after the watchdog's one-time LoRA check (a step of its own, not the steady state)
    first = max(warmup, watchdog.lora_check_step)
    callbacks = [timer, log, watchdog] + ([Profile(first, out_dir)] if profile and cuda else [])
    if (timeline or sync_debug) and cuda:
        callbacks.append(Timeline(first, out_dir, timeline or 1, sync_debug, timeline_cpu))
    collator = PackedCollator() if packed else PadCollator(0)
    ph = Phases() if phases else None
    trainer_cls = InternVLTrainer
    if ph is not None:
        base = model.get_base_model()
        ph.hook(base.model.vision_tower, "vision_ms")
        ph.hook(base.model.language_model, "llm_fwd_ms")
        trainer_cls = timed_trainer(ph, timer)
    trainer = trainer_cls(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=callbacks,
                              stats=stats, lengths=lengths, fast_loss=mode in ("packed", "padded-fast"),
                              token_budget=budget)
    trainer.remove_callback(PrinterCallback)  # as the training command: the log line prints instead
    share = None
    if ckpt == "auto" or 0 < ckpt < 1:
        share = _CheckpointShare(model, ckpt, budget or bs * max(lengths))
        trainer.add_callback(share)
    gc.callbacks.append(pauses)
    try:
        trainer.train()
        if cuda:
            torch.cuda.synchronize()
    finally:
        gc.callbacks.remove(pauses)
    dt = time.perf_counter() - timer.t0
    extra = pauses.summary(len(timed))
    if ph is not None:
        extra.update(ph.summary(len(timed)))
        extra["step_ms"] = round(dt * 1e3 / len(timed), 1)
    real = sum(len(i) for g in timed for i, _, _ in g)
    flops = sum(model_flops(cfg, g) for g in timed)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    if share is not None and share.plan is not None:
        extra["checkpointed_layers"] = share.plan.checkpointed
        extra["planned_activation_gib"] = round(share.plan.estimate / 2**30, 1)
    return dict(size=size, mode=mode, bs=bs, token_budget=budget, grad_ckpt=ckpt, liger=liger, fused_lora=fused,
                compile=compile, chunked_loss=chunked, grad_accum=accum, lora_dropout=dropout, max_grad_norm=max_grad_norm, steps=len(timed), options=done,
                real_tokens_per_s=round(real / dt), samples_per_s=round(sum(len(g) for g in timed) / dt, 2),
                model_tflops=round(flops / dt / 1e12, 1),
                peak_gib=round(peak, 1), **extra)

class Timeline(TrainerCallback):
    """CUDA-only torch.profiler over `steps` steps after the warm-up (no CPU events, no Python stacks, so
    the host is not slowed down): writes OUT_DIR/kernels.txt (the top kernels by GPU time) and
    OUT_DIR/timeline.json.gz for bench/trace_gaps.py, which then
    reports the GPU busy share of real steps and names the kernels around each idle gap. With
    `sync_debug`, torch warns (with the call site) at every host-device synchronization of one step."""

    def __init__(self, warmup, out_dir, steps=4, sync_debug=False, cpu_ops=False):
        self.warmup, self.out_dir, self.steps, self.sync_debug, self.prof = warmup, out_dir, steps, sync_debug, None
        self.cpu_ops = cpu_ops  # also the host's operators (no Python stacks): which one launched a late kernel

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.warmup and self.prof is None:  # steps warmup + 1 ... warmup + steps
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            self.prof = profile(activities=[ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if self.cpu_ops else []))
            self.prof.__enter__()
        if self.sync_debug and state.global_step == self.warmup + self.steps + 1:
            torch.cuda.set_sync_debug_mode("warn")

    def on_step_end(self, args, state, control, **kw):
        if self.prof is not None and state.global_step == self.warmup + self.steps:
            # the kernels of these steps by GPU time (no host events: names and counts only)
            _finish_profile(self.prof, self.out_dir, "kernels.txt", "timeline", sort_by="self_cuda_time_total",
                            row_limit=40, max_name_column_width=90)
            self.prof = None
        if self.sync_debug and state.global_step == self.warmup + self.steps + 1:
            torch.cuda.set_sync_debug_mode(0)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1b,8b")
    ap.add_argument("--modes", default="packed")
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-tiles", type=int, default=6)
    ap.add_argument("--ckpt", default="1", help="comma list: share of LLM layers recomputed (0 off, 1 all, 0.5 half, auto: train.checkpoint_layers=auto)")
    ap.add_argument("--liger", default="0", help="comma list of 0/1")
    ap.add_argument("--fused", default="1", help="comma list of 0/1: fused LoRA layers (part of train.fused)")
    ap.add_argument("--chunked", default="1", help="comma list of 0/1: chunked loss (part of train.fused)")
    ap.add_argument("--compile", default="0", help="comma list of 0/1: torch.compile of each decoder layer (benchmark only)")
    ap.add_argument("--budget", default="0", help="comma list of token budgets per micro-batch (0: batch of --bs samples)")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of two steps (first configuration)")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (with --budget)")
    ap.add_argument("--phases", action="store_true", help="time the phases of a step (synchronizing after each)")
    ap.add_argument("--timeline", type=int, default=0, help="CUDA-only trace of this many steps (first configuration)")
    ap.add_argument("--timeline-cpu", action="store_true", help="with --timeline: also the host's operators (no Python stacks)")
    ap.add_argument("--sync-debug", action="store_true", help="warn at each host-device sync of one step (first configuration)")
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    ap.add_argument("--out", default="runs/bench_train_step", help="trainer output folder (relative: to the current folder)")
    ap.add_argument("--lora-kernels", type=int, default=1, help="with --fused 1: LoRA dropout in Triton kernels (0/1; part of train.fused)")
    ap.add_argument("--fused-mlp", type=int, default=1, help="with --fused 1: fused SwiGLU MLPs (0/1; part of train.fused)")
    ap.add_argument("--kernel-config", default="", help="JSON {G, config} for internvl_lora.lora.kernels (the last line of lora_layer_bench.py --sweep)")
    ap.add_argument("--cudnn-sdpa", action="store_true", help="keep SDPA's cuDNN backend on (A/B)")
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (the recipe's 0.05)")
    a = ap.parse_args()
    if a.kernel_config:
        from internvl_lora.lora import kernels

        tuned = json.loads(a.kernel_config)  # the last line of lora_layer_bench.py --sweep
        kernels.G = tuned.get("G", kernels.G)
        kernels.CONFIG.update(tuned.get("config", {}))
    grid = [(s, m, c if c == "auto" else float(c), int(lg), int(f), int(cp), int(b), int(ch)) for s in a.sizes.split(",")
            for m in a.modes.split(",") for c in a.ckpt.split(",") for lg in a.liger.split(",")
            for f in a.fused.split(",") for cp in a.compile.split(",") for b in a.budget.split(",")
            for ch in a.chunked.split(",")]
    rate = None
    if torch.cuda.is_available():
        from matmul_rate import matmul_tflops  # bench/matmul_rate.py, next to this script

        rate = round(matmul_tflops())
    for k, (s, m, c, lg, f, cp, b, ch) in enumerate(grid):
        try:
            r = run(s, m, a.bs, a.steps, a.max_tiles, c, bool(lg), a.out, dropout=a.dropout, fused=bool(f),
                    compile=bool(cp), budget=b, profile=a.profile and k == 0, chunked=bool(ch), phases=a.phases, accum=a.accum,
                    timeline=a.timeline if k == 0 else 0, timeline_cpu=a.timeline_cpu, sync_debug=a.sync_debug and k == 0,
                    max_grad_norm=a.max_grad_norm, cudnn_sdpa=a.cudnn_sdpa, lora_kernels=bool(a.lora_kernels),
                    fused_mlp=bool(a.fused_mlp))
        except Exception as e:  # one failing configuration must not hide the others
            r = dict(size=s, mode=m, grad_ckpt=c, liger=lg, fused_lora=f, compile=cp, token_budget=b, chunked_loss=ch,
                     error=repr(e)[:600])
        if rate and "model_tflops" in r:  # the reference: the card's dense bf16 matmul rate, this process
            # measured again right after the run too: on one card it moved by up to 8 % between runs of a call
            after = round(matmul_tflops())
            r.update(matmul_tflops=rate, pct_of_matmul=round(100 * r["model_tflops"] / rate, 1),
                     matmul_tflops_after=after, pct_of_matmul_after=round(100 * r["model_tflops"] / after, 1))
            rate = after
        print(json.dumps(r), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
