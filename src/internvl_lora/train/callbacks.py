"""Trainer callbacks: a dense log line, a loss-curve PNG and a loss-health watchdog (the generation metric:
`generation_eval`).

Generic: nothing here knows which model is trained. Every decision that stops training is taken
the same way on every rank (flags are all-reduced), so a diagnosis never leaves one rank waiting in
a collective for the others.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..data.collate import batch_counts
from ..errors import UserError
from ..plots import plot_loss_curve
from ..run_dir import read_metrics


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce(values: list[float], op: str = "sum", device=None) -> list[float]:
    """Reduce a few numbers over all ranks (identity without torch.distributed)."""
    if not _dist_ready() or torch.distributed.get_world_size() == 1:
        return list(values)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op={"sum": torch.distributed.ReduceOp.SUM,
                                        "max": torch.distributed.ReduceOp.MAX}[op])
    return t.tolist()


class StepStats:
    """Counters the trainer fills on every training micro-batch (tokens, trained tokens, image tiles).

    `tokens`, `trained`, `tiles` are this rank's; `sync()` (called at every log, on every rank) adds
    up all ranks into `global_*`. `data_wait` / `checkpoint`: this rank's seconds spent waiting for the
    data loader / writing checkpoints; `global_data_wait` is the slowest rank's (it holds the others back).
    `step_losses` / `step_empty` cover the current optimizer step only (the watchdog reads and clears them).
    """

    def __init__(self):
        self.tokens = 0
        self.trained = 0
        self.tiles = 0
        self.empty_batches = 0
        self.step_empty = 0
        self.step_losses: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self.global_tokens = self.global_trained = self.global_tiles = 0
        self.data_wait = self.checkpoint = self.global_data_wait = 0.0

    def add(self, inputs: dict) -> None:
        """Count a micro-batch: from its `batch_counts` (worked out on the host by `data.collate.HostSide`), or
        else from its tensors (which waits for the GPU when they live there)."""
        counts = inputs.get("batch_counts") or batch_counts(inputs)
        self.tokens += counts["tokens"]
        self.trained += counts["trained"]
        if counts["trained"] == 0:
            self.empty_batches += 1
            self.step_empty += 1
        self.tiles += counts["tiles"]

    def add_loss(self, loss: torch.Tensor) -> None:
        """Keep a micro-batch's loss for the watchdog. On a GPU it is copied to pinned host memory as soon
        as the forward has computed it, and an event marks that point: reading it at the end of the step
        then waits for that forward only, not for the backward and optimizer queued behind it."""
        value = loss.detach().float().reshape(-1)[:1]
        if value.is_cuda:
            host = torch.empty(1, dtype=torch.float32, pin_memory=True)
            host.copy_(value, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self.step_losses.append((host, done))
        else:
            self.step_losses.append((value, None))

    def losses(self) -> list[float]:
        """The losses kept since the last `clear_step`, as floats."""
        out = []
        for value, done in self.step_losses:
            if done is not None:
                done.synchronize()
            out.append(float(value))
        return out

    def clear_step(self) -> None:
        self.step_losses, self.step_empty = [], 0

    def sync(self) -> None:
        self.global_tokens, self.global_trained, self.global_tiles = (
            int(v) for v in all_reduce([self.tokens, self.trained, self.tiles]))
        self.global_data_wait = all_reduce([self.data_wait], op="max")[0]


#: Share of an interval spent waiting for the data loader from which the log line shows it (a hint to raise
#: data.num_workers; metrics.jsonl always has `data_wait_s` and `data_wait_share`).
DATA_WAIT_SHOWN = 0.1


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class LogLine(TrainerCallback):
    """One line per logging interval, rank 0 only: step, loss, lr, grad norm, share of trained tokens,
    tokens/s, tiles/s (all ranks together), ETA, peak memory.

    Also appends every logged record to `metrics.jsonl` in the output folder (on resume, records after the
    resumed step are dropped first). The trainer calls `measure` first, so TensorBoard gets the figures too.
    """

    def __init__(self, stats: StepStats, out_dir: str | Path, print_fn=print, resume_step: int | None = None,
                 is_main: bool = True):
        self.stats, self.out_dir, self.print = stats, Path(out_dir), print_fn
        self.t0 = self.t_last = None
        self.start_step = 0
        self.last = (0, 0, 0)
        self.last_waits = (0.0, 0.0)  # data wait and checkpoint seconds at the last record
        self.eta = 0.0
        self.measured: dict | None = None  # what `measure` added to the record being logged
        self.history: list[dict] = []
        self.path = self.out_dir / "metrics.jsonl"
        if resume_step is not None:
            self.history = read_metrics(self.path, resume_step)
            if is_main:
                self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history), encoding="utf-8")
        elif is_main and self.path.exists():
            self.path.unlink()  # a fresh run: a metrics.jsonl left by an earlier run would mix two curves

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = self.t_last = time.time()
        self.start_step = state.global_step
        self.last = (self.stats.global_tokens, self.stats.global_trained, self.stats.global_tiles)
        self.last_waits = (self.stats.global_data_wait, self.stats.checkpoint)

    def measure(self, logs: dict, state) -> dict:
        """The figures of a training record (throughput since the last one, label coverage, memory); {} for
        others. An evaluation's `eval*_runtime` is taken out of the interval: its tokens are training tokens."""
        now = time.time()
        if self.t0 is None:
            self.t0 = self.t_last = now
        if "loss" not in logs:
            paused = sum(v for k, v in logs.items() if k.startswith("eval") and k.endswith("_runtime")
                         and isinstance(v, (int, float)))
            self.t_last = min(now, self.t_last + paused)
            self.measured = {}
            return self.measured
        dt = max(1e-9, now - self.t_last)
        tokens, trained, tiles = self.stats.global_tokens, self.stats.global_trained, self.stats.global_tiles
        d_tokens, d_trained, d_tiles = tokens - self.last[0], trained - self.last[1], tiles - self.last[2]
        self.t_last, self.last = now, (tokens, trained, tiles)
        d_wait = self.stats.global_data_wait - self.last_waits[0]
        d_checkpoint = self.stats.checkpoint - self.last_waits[1]
        self.last_waits = (self.stats.global_data_wait, self.stats.checkpoint)
        elapsed = now - self.t0
        self.eta = elapsed / max(1, state.global_step - self.start_step) * max(0, state.max_steps - state.global_step)
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        self.measured = {
            "tokens_per_s": round(d_tokens / dt, 1), "tiles_per_s": round(d_tiles / dt, 2), "trained_tokens": trained,
            "label_coverage": round(d_trained / d_tokens if d_tokens else 0.0, 5), "elapsed_s": round(elapsed, 1),
            "peak_mem_gib": round(mem, 2), "data_wait_s": round(d_wait, 3), "data_wait_share": round(d_wait / dt, 3)}
        if d_checkpoint > 0:
            self.measured["checkpoint_s"] = round(d_checkpoint, 2)
        return self.measured

    def write(self, record: dict) -> None:
        self.history.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs:
            return
        measured = self.measured if self.measured is not None else self.measure(logs, state)
        self.measured = None
        if not state.is_world_process_zero:
            return
        record = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))},
                  **measured}
        self.write(record)
        parts = [f"step {state.global_step}/{state.max_steps}"]
        if "loss" in logs:
            parts.append(f"loss {logs['loss']:.4f}")
        if "rewards/accuracy" in logs:  # the preference objective
            parts.append(f"reward acc {logs['rewards/accuracy']:.2f} margin {logs['rewards/margin']:.3f}")
        for k, v in logs.items():
            if "/" in k and k not in ("eval_rewards/accuracy", "eval_rewards/margin"):
                continue  # the other preference metrics: metrics.jsonl and tensorboard only
            if k.startswith("eval_") and isinstance(v, (int, float)) and not k.endswith(
                    ("_runtime", "_per_second")):
                parts.append(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}")
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.2e}")
        if "grad_norm" in logs:
            parts.append(f"gnorm {logs['grad_norm']:.2f}")
        if measured:
            parts += [f"trained {100 * record['label_coverage']:.1f}% of tokens", f"{record['tokens_per_s']:,.0f} tok/s",
                      f"{record['tiles_per_s']:,.1f} tiles/s", f"eta {_fmt_time(self.eta)}"]
            if record["peak_mem_gib"]:
                parts.append(f"mem {record['peak_mem_gib']:.1f} GiB")
            if record["data_wait_share"] >= DATA_WAIT_SHOWN:
                parts.append(f"data wait {100 * record['data_wait_share']:.0f}%")
        if len(parts) > 1:
            self.print(" | ".join(parts))


class LossCurve(TrainerCallback):
    """Writes `loss_curve.png` at every save and at the end of training (rank 0).

    At a save a child process draws it from metrics.jsonl: matplotlib's import and drawing take 0.5-1 s of
    CPU that the training loop (one Python thread, which keeps the GPU fed) should not share. A save
    while the previous drawing still runs starts none: the next save or the end draws the newer curve.
    A drawing that fails is raised at the next save or at the end, with its error output.
    """

    command = [sys.executable, "-m", "internvl_lora.plots"]  # + METRICS.jsonl OUT.png

    def __init__(self, log: LogLine, out_dir: str | Path):
        self.log, self.out_dir = log, Path(out_dir)
        self._child: tuple[subprocess.Popen, object] | None = None  # (process, its stderr file)

    def wait(self) -> None:
        """Wait for a drawing under way; raise its error if it failed."""
        if self._child is None:
            return
        proc, err = self._child
        self._child = None
        proc.wait()
        err.seek(0)
        message = err.read().decode("utf-8", "replace").strip()
        err.close()
        if proc.returncode:
            raise RuntimeError(f"drawing {self.out_dir / 'loss_curve.png'} failed (exit {proc.returncode}): {message}")

    def write(self) -> None:
        """Draw the curve now, in this process (rank 0 calls this once training is over)."""
        self.wait()
        plot_loss_curve(self.log.history, self.out_dir / "loss_curve.png")

    def on_save(self, args, state, control, **kw):
        if not state.is_world_process_zero:
            return
        if self._child is not None and self._child[0].poll() is None:
            return
        self.wait()
        if not self.log.path.exists():  # nothing logged yet
            return
        err = tempfile.TemporaryFile()
        proc = subprocess.Popen([*self.command, str(self.log.path), str(self.out_dir / "loss_curve.png")],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        self._child = (proc, err)

    def on_train_end(self, args, state, control, **kw):
        if state.is_world_process_zero:
            self.write()


class TrainingHealthError(UserError):
    """Training stopped by the watchdog; the message is the diagnosis (printed by the CLI without traceback)."""


def _local_tensor(p) -> torch.Tensor:
    """The values this rank holds (DeepSpeed ZeRO-3 keeps the local shard in `ds_tensor`)."""
    if p.numel() == 0 and hasattr(p, "ds_tensor"):
        return p.ds_tensor
    return p.detach()


def lora_b_max(model) -> float | None:
    """max |B| over every LoRA B matrix on all ranks (None: the model has none). Empty shards are skipped."""
    found, maxima = 0.0, {}
    for name, p in model.named_parameters():
        if "lora_B" not in name:
            continue
        found = 1.0
        t = _local_tensor(p)
        if t.numel():
            maxima.setdefault(t.device, []).append(t.abs().max().float())
    # one read per device (a model of 196 adapted layers waited for the GPU 196 times)
    local = max((float(torch.stack(m).max()) for m in maxima.values()), default=0.0)
    local, found = all_reduce([local, found], "max")
    return local if found else None


class Watchdog(TrainerCallback):
    """Stops training with a diagnosis instead of letting it silently learn nothing.

    - a micro-batch with no trained token (every label masked), checked at every optimizer step;
    - a loss that is not finite (checked at every optimizer step) or exactly 0 (per logging interval);
    - LoRA B matrices still all zero after `lora_check_step` optimizer steps (no gradient reaches them);
    - a gradient norm that is not finite, or above `max_grad_norm_alarm` for `patience` logged
      intervals in a row.

    On a diagnosis the step is neither saved nor evaluated (a broken state must not rotate away the
    last good checkpoint); `train` then raises `TrainingHealthError`.
    """

    def __init__(self, stats: StepStats, model=None, lora_check_step: int = 5, max_grad_norm_alarm: float = 1e4,
                 patience: int = 3):
        self.stats, self.model = stats, model
        self.lora_check_step, self.alarm, self.patience = lora_check_step, max_grad_norm_alarm, patience
        self.high = 0
        self.checked_lora = False
        self.lora_starts_zero = False
        self.diagnosis: str | None = None

    def _stop(self, control, message: str):
        if self.diagnosis is None:
            self.diagnosis = message
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False

    def on_train_begin(self, args, state, control, model=None, **kw):
        model = self.model if self.model is not None else model
        if model is None:
            return
        b = lora_b_max(model)
        # Only a zero-initialised B (default / gaussian init) must move; PiSSA/OLoRA start non-zero, and a
        # resumed run may already be past the check.
        self.lora_starts_zero = b == 0.0
        self.checked_lora = state.global_step >= self.lora_check_step or not self.lora_starts_zero

    def on_step_end(self, args, state, control, model=None, **kw):
        losses = self.stats.losses()
        nonfinite = float(any(not math.isfinite(x) for x in losses))
        empty, nonfinite = all_reduce([float(self.stats.step_empty), nonfinite], "sum")
        bad_loss = next((x for x in losses if not math.isfinite(x)), float("nan"))
        self.stats.clear_step()
        if empty:
            self._stop(control, f"{int(empty)} micro-batch(es) of optimizer step {state.global_step} had no trained "
                                "token (every label is -100): the loss is 0 or NaN and nothing is learned. Check "
                                "the label masking with `internvl-lora data inspect META --model CKPT --index 0`")
            return
        if nonfinite:
            self._stop(control, f"the loss is {bad_loss} at optimizer step {state.global_step}: lower train.lr or raise "
                                "train.warmup_ratio, check the data (`internvl-lora data check`), and prefer "
                                "bfloat16/float32 to float16")
            return
        model = self.model if self.model is not None else model
        if model is None or self.checked_lora or state.global_step < self.lora_check_step:
            return
        self.checked_lora = True
        b = lora_b_max(model)
        if b is not None and b == 0.0:
            self._stop(control, f"every LoRA B matrix is still exactly zero after {state.global_step} optimizer "
                                "steps: no update reaches the adapters (learning rate 0 or a scheduler stuck at 0? "
                                "frozen inputs with reentrant gradient checkpointing?)")

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        loss = logs.get("loss")
        if loss is not None:
            if not math.isfinite(loss):
                self._stop(control, f"the loss is {loss} at step {state.global_step}: lower train.lr or raise "
                                    "train.warmup_ratio, check the data (`internvl-lora data check`), and prefer "
                                    "bfloat16/float32 to float16")
            elif loss == 0.0:
                self._stop(control, f"the loss is exactly 0 at step {state.global_step}: no token is being trained "
                                    "(labels all masked?) — run `internvl-lora data inspect` on a few samples")
        gn = logs.get("grad_norm")
        if gn is not None:
            if not math.isfinite(gn):
                self._stop(control, f"the gradient norm is {gn} at step {state.global_step}: the gradients overflowed; "
                                    "lower train.lr, raise train.warmup_ratio, or use bfloat16 instead of float16")
                return
            self.high = self.high + 1 if gn > self.alarm else 0
            if self.high >= self.patience:
                self._stop(control, f"the gradient norm exploded: {gn:.3g} at step {state.global_step}, above "
                                    f"{self.alarm:g} (train.watchdog_grad_norm) for {self.patience} log intervals in "
                                    "a row: lower train.lr or raise train.warmup_ratio")
