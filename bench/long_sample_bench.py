"""Long samples at the 8B shape on one GPU: 16k and 32k-token video samples, ours vs the naive stack.

    python bench/long_sample_bench.py --tokens 16384,32768 [--steps 3] [--size 8b]

A sample of T tokens is a video question: T/512 frames of one 448px tile (256 tokens each; 32 frames at
16k, 64 at 32k), a 64-token prefix, a 256-token question, and an answer filling the rest (trained).
Runs, each on the same samples, one sample per step:
  ours auto  -- `train_step_bench.run`: our training path with train.checkpoint_layers=auto (the share
                of recomputed layers planned from the free memory), packed, fused, chunked loss;
  ours all   -- the same with every layer recomputed (train.checkpoint_layers=1);
  naive ckpt -- bench/naive_lora_step.py's stack (transformers + PEFT, SDPA, full logits) with
                gradient checkpointing on every layer;
  naive      -- the same without checkpointing (expected to run out of memory).
Prints one JSON line per run (an out-of-memory run: its error and the memory at that point).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from naive_lora_step import IMG_TOKEN, TOK_PER_TILE, batch, build, model_flops  # noqa: E402
from train_step_bench import run as run_ours  # noqa: E402


def long_samples(n: int, tokens: int, seed: int = 0):
    """(ids, labels, tiles) of `n` video samples of exactly `tokens` tokens (see the module docstring)."""
    rng = random.Random(seed)
    frames = tokens // 512
    out = []
    for _ in range(n):
        pre, q = 64, 256
        a = tokens - pre - q - frames * TOK_PER_TILE
        ids = [rng.randint(1100, 1900) for _ in range(pre)] + [IMG_TOKEN] * (TOK_PER_TILE * frames) \
            + [rng.randint(1100, 1900) for _ in range(q + a)]
        out.append((ids, [-100] * (len(ids) - a) + ids[-a:], frames))
    return out


def run_naive(size: str, items, ckpt: bool, warmup: int) -> dict:
    model, cfg = build(size, "sdpa", "cuda")
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-5)
    torch.cuda.reset_peak_memory_stats()
    t0, real, flops = None, 0, 0.0
    try:
        for k, item in enumerate(items):
            if k == warmup:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            loss = model(**batch([item], "padded", "cuda")).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if k >= warmup:
                real += len(item[0])
                flops += model_flops(cfg, [item])
        torch.cuda.synchronize()
    except torch.OutOfMemoryError as e:
        peak = torch.cuda.max_memory_allocated() / 2**30
        del model, opt
        return {"error": "out of memory", "detail": str(e).splitlines()[0][:200], "peak_gib_before": round(peak, 1)}
    dt = time.perf_counter() - t0
    out = {"real_tokens_per_s": round(real / dt), "model_tflops": round(flops / dt / 1e12, 1),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1), "loss": round(loss.item(), 3)}
    del model, opt
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="8b")
    ap.add_argument("--tokens", default="16384,32768")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", default="ours-auto,ours-all,naive-ckpt,naive")
    ap.add_argument("--out", default="runs/bench_long")
    a = ap.parse_args()
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    for tokens in (int(t) for t in a.tokens.split(",")):
        items = long_samples(a.steps + a.warmup, tokens)
        for name in a.runs.split(","):
            t0 = time.perf_counter()
            try:
                if name.startswith("ours"):
                    r = run_ours(a.size, "packed", 1, a.steps, 1, "auto" if name == "ours-auto" else 1.0, False,
                                 a.out, warmup=a.warmup, items=items, budget=tokens)
                    r = {k: r[k] for k in ("real_tokens_per_s", "model_tflops", "peak_gib", "checkpointed_layers",
                                           "planned_activation_gib") if k in r}
                else:
                    r = run_naive(a.size, items, name == "naive-ckpt", a.warmup)
            except torch.OutOfMemoryError as e:
                r = {"error": "out of memory", "detail": str(e).splitlines()[0][:200]}
            r = {"run": name, "size": a.size, "tokens": tokens, "frames": tokens // 512, "card_gib": round(total, 1),
                 "wall_s": round(time.perf_counter() - t0, 1), **r}
            print(json.dumps(r), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
