"""The generation metric during training: greedy answers on held-out samples every N steps, scored with
exact match / ANLS / ROUGE-L (`train.generate_steps`). Generic: the model is driven through `infer`.
"""

from __future__ import annotations

import math
import time

import torch
from transformers import TrainerCallback

from .callbacks import Watchdog, _dist_ready


def generation_samples(lines, limit: int) -> list[dict]:
    """(question, history, images, reference) of the first `limit` held-out lines (image or text samples)."""
    from ..data.heldout import heldout_samples

    if limit < 1:  # train.generate_samples 0: no sample (heldout_samples reads 0 as "all")
        return []
    return heldout_samples(lines, limit)[0]  # the audit of the held-out data has reported its problems


class GenerationEval(TrainerCallback):
    """Every `every` optimizer steps (and at the end), greedy answers on held-out samples, scored with
    exact match / ANLS / ROUGE-L and logged as `eval_gen_<metric>` (metrics.jsonl, tensorboard, the log line).

    The samples are split over the ranks and the scores gathered, so every rank runs the same
    number of `generate` calls (needed under ZeRO-3, where `generate` syncs the ranks).
    """

    def __init__(self, samples: list[dict], tokenizer, settings, every: int, max_new_tokens: int = 32,
                 batch_size: int = 8):
        self.samples, self.tokenizer, self.settings = samples, tokenizer, settings
        self.every, self.max_new_tokens, self.batch_size = every, max_new_tokens, batch_size
        self.trainer = None
        self.watchdog: Watchdog | None = None  # no generation after a diagnosis
        self.last_step = -1
        self.pending: int | None = None  # a step whose generation waits for its training record
        self.results: list[dict] = []

    def evaluate(self, model, device) -> dict:
        from ..infer import Loaded, build_inputs, generate
        from ..metrics import aggregate, score

        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if _dist_ready() else (0, 1)
        mine = self.samples[rank::world]
        loaded = Loaded(model, self.tokenizer, self.settings, str(device))
        was_training = model.training
        model.eval()
        rows = []
        try:
            # Every rank makes the same number of generate calls (the last one may be a repeat) for ZeRO-3.
            n_calls = math.ceil(math.ceil(len(self.samples) / world) / self.batch_size)
            for k in range(n_calls):
                chunk = mine[k * self.batch_size:(k + 1) * self.batch_size]
                real = len(chunk)
                chunk = chunk or self.samples[:1]
                batch = [build_inputs(s["question"], s["images"], self.settings, self.tokenizer, s["history"],
                                      s["system"]) for s in chunk]
                answers = generate(loaded, batch, self.max_new_tokens)
                rows += [score(a, s["reference"]) for a, s in zip(answers[:real], chunk[:real])]
        finally:
            model.train(was_training)
        if world > 1:
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        agg = aggregate(rows)
        return {f"eval_gen_{k}": v for k, v in agg.items() if k != "count" and v is not None} | \
            {"eval_gen_samples": agg["count"]}

    def _run(self, state):
        if self.trainer is None or not self.samples or state.global_step == self.last_step:
            return
        if self.watchdog is not None and self.watchdog.diagnosis:
            return
        self.last_step = state.global_step
        started = time.time()
        metrics = self.evaluate(self.trainer.model, self.trainer.args.device)
        self.results.append({"step": state.global_step, **metrics})
        # The runtime lets the log line take the generation time out of the training throughput.
        self.trainer.log({**metrics, "eval_gen_runtime": round(time.time() - started, 3)})

    def on_step_end(self, args, state, control, **kw):
        if self.every and state.global_step % self.every == 0 and not control.should_training_stop:
            if control.should_log:
                self.pending = state.global_step  # after this step's training record (`on_log`)
            else:
                self._run(state)

    def on_log(self, args, state, control, logs=None, **kw):
        if self.pending == state.global_step and logs and "loss" in logs:
            self.pending = None
            self._run(state)

    def on_train_end(self, args, state, control, **kw):
        if self.every:
            self._run(state)
