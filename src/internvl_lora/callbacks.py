"""Trainer callbacks: a dense log line, a loss-curve PNG, and a loss-health watchdog.

Generic: nothing here knows which model is trained.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


class StepStats:
    """Counters the trainer fills on every micro-batch (tokens, trained tokens, image tiles)."""

    def __init__(self):
        self.tokens = 0
        self.trained = 0
        self.tiles = 0
        self.empty_batches = 0

    def add(self, inputs: dict) -> None:
        labels = inputs.get("labels")
        mask = inputs.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        trained = int((labels != -100).sum()) if labels is not None else 0
        self.trained += trained
        self.empty_batches += trained == 0
        pv = inputs.get("pixel_values")
        self.tiles += int(pv.shape[0]) if pv is not None else 0


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class LogLine(TrainerCallback):
    """One line per logging interval, rank 0 only: step, loss, lr, tokens/s, tiles/s, ETA, peak memory.

    Also appends every logged record to `metrics.jsonl` in the output folder.
    """

    def __init__(self, stats: StepStats, out_dir: str | Path, print_fn=print):
        self.stats, self.out_dir, self.print = stats, Path(out_dir), print_fn
        self.t0 = self.t_last = None
        self.last = (0, 0, 0)
        self.history: list[dict] = []

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = self.t_last = time.time()
        self.last = (self.stats.tokens, self.stats.trained, self.stats.tiles)

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        now = time.time()
        dt = max(1e-9, now - self.t_last)
        tokens, trained, tiles = self.stats.tokens, self.stats.trained, self.stats.tiles
        tok_s = (tokens - self.last[0]) / dt
        tiles_s = (tiles - self.last[2]) / dt
        self.t_last, self.last = now, (tokens, trained, tiles)
        elapsed = now - self.t0
        eta = elapsed / max(1, state.global_step) * max(0, state.max_steps - state.global_step)
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        record = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))},
                  "tokens_per_s": round(tok_s, 1), "tiles_per_s": round(tiles_s, 2),
                  "trained_tokens": trained, "elapsed_s": round(elapsed, 1), "peak_mem_gib": round(mem, 2)}
        self.history.append(record)
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        parts = [f"step {state.global_step}/{state.max_steps}"]
        if "loss" in logs:
            parts.append(f"loss {logs['loss']:.4f}")
        if "eval_loss" in logs:
            parts.append(f"eval_loss {logs['eval_loss']:.4f}")
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.2e}")
        if "grad_norm" in logs:
            parts.append(f"gnorm {logs['grad_norm']:.2f}")
        parts += [f"{tok_s:,.0f} tok/s", f"{tiles_s:,.1f} tiles/s", f"eta {_fmt_time(eta)}"]
        if mem:
            parts.append(f"mem {mem:.1f} GiB")
        self.print(" | ".join(parts))


def plot_loss_curve(history: list[dict], path: str | Path) -> Path | None:
    """Write a loss-curve PNG (train and eval loss against steps)."""
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


class LossCurve(TrainerCallback):
    """Writes `loss_curve.png` at every save and at the end of training."""

    def __init__(self, log: LogLine, out_dir: str | Path):
        self.log, self.out_dir = log, Path(out_dir)

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            plot_loss_curve(self.log.history, self.out_dir / "loss_curve.png")

    def on_train_end(self, args, state, control, **kw):
        self.on_save(args, state, control)


class TrainingHealthError(RuntimeError):
    """Training stopped by the watchdog; the message is the diagnosis."""


class Watchdog(TrainerCallback):
    """Stops training with a diagnosis instead of letting it silently learn nothing.

    - loss exactly 0 or not finite;
    - a micro-batch with no trained token (every label masked);
    - LoRA B matrices still all zero after `lora_check_step` optimizer steps (no gradient reaches them);
    - gradient norm above `max_grad_norm_alarm` for `patience` logged intervals in a row.
    """

    def __init__(self, stats: StepStats, model=None, lora_check_step: int = 3, max_grad_norm_alarm: float = 1e4,
                 patience: int = 3):
        self.stats, self.model = stats, model
        self.lora_check_step, self.alarm, self.patience = lora_check_step, max_grad_norm_alarm, patience
        self.high = 0
        self.checked_lora = False
        self.diagnosis: str | None = None

    def _stop(self, control, message: str):
        self.diagnosis = message
        control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        loss = logs.get("loss")
        if loss is not None:
            if not math.isfinite(loss):
                self._stop(control, f"loss is {loss} at step {state.global_step}: lower train.lr, check the data "
                                    "(run `internvl-lora data check`), or use float32/bf16 instead of fp16")
            elif loss == 0.0:
                self._stop(control, f"loss is exactly 0 at step {state.global_step}: no token is being trained "
                                    "(labels all masked?) — run `internvl-lora data inspect` on a few samples")
        gn = logs.get("grad_norm")
        if gn is not None:
            self.high = self.high + 1 if (not math.isfinite(gn) or gn > self.alarm) else 0
            if self.high >= self.patience:
                self._stop(control, f"gradient norm {gn} stayed above {self.alarm} for {self.patience} log "
                                    "intervals: lower train.lr or raise warmup")
        if self.stats.empty_batches:
            self._stop(control, f"{self.stats.empty_batches} micro-batch(es) had no trained token")

    def on_step_end(self, args, state, control, **kw):
        if self.model is None or self.checked_lora or state.global_step < self.lora_check_step:
            return
        self.checked_lora = True
        bs = [p for n, p in self.model.named_parameters() if "lora_B" in n]
        if bs and all(float(p.detach().abs().max()) == 0.0 for p in bs):
            self._stop(control, f"every LoRA B matrix is still zero after {state.global_step} optimizer steps: "
                                "no gradient reaches the adapters (frozen inputs with reentrant checkpointing? "
                                "learning rate 0?)")
