"""Preference (MPO) training-step throughput: our path vs a naive TRL-DPO-like step (random weights).

    python bench/mpo_step_bench.py --sizes 8b --modes naive,ours [--steps 10] [--pairs 4]

Both run the same pairs (bench/naive_lora_step.py's sample draws: 1-6 tiles + thumbnail, prefix and
question tokens; each pair gets a chosen and a rejected answer of 32-512 tokens) through PEFT LoRA r16
on the LLM in bf16, and the same loss (0.8 DPO sigmoid + 0.2 BCO pair + 1.0 SFT, beta 0.1):
- naive: what a TRL-DPO-style trainer does: chosen and rejected padded into 2 x pairs rows, each
  pair's tiles fed twice (once per answer), full logits, the policy forward and a separate reference
  forward (adapters disabled), activation checkpointing on;
- ours: `train.preference.PreferenceObjective` on `PreferenceCollator` + packed batches (varlen
  attention), tiles encoded once, logits only at trained positions, our fused LoRA / SwiGLU paths,
  no activation checkpointing (`--ckpt 1` to turn it on).
Prints one JSON line per configuration: tokens/s (both answers' real tokens), peak memory, loss.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from naive_lora_step import IMG_TOKEN, TOK_PER_TILE, build  # noqa: E402

BETA, WEIGHTS = 0.1, (0.8, 0.2, 1.0)


def pairs(n, rng, max_tiles):
    """(prompt ids, chosen answer ids, rejected answer ids, tiles) per pair."""
    out = []
    for _ in range(n):
        tiles = rng.randint(1, max_tiles)
        patches = tiles + (1 if tiles > 1 else 0)
        pre, q = rng.randint(16, 64), rng.randint(16, 128)
        prompt = [rng.randint(1100, 1900) for _ in range(pre)] + [IMG_TOKEN] * (TOK_PER_TILE * patches) \
            + [rng.randint(1100, 1900) for _ in range(q)]
        answers = [[rng.randint(1100, 1900) for _ in range(rng.randint(32, 512))] for _ in range(2)]
        out.append((prompt, answers[0], answers[1], patches))
    return out


def features(group, device):
    """The items `PreferenceDataset` would give for these pairs (random tiles)."""
    items = []
    for prompt, chosen, rejected, patches in group:
        item = {"pixel_values": torch.randn(patches, 3, 448, 448, dtype=torch.bfloat16)}
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            item[f"{name}_input_ids"] = torch.tensor(prompt + answer)
            item[f"{name}_labels"] = torch.tensor([-100] * len(prompt) + answer)
        items.append(item)
    return items


def naive_step(model, items, device, running):
    """Padded rows (chosen rows then rejected rows), tiles twice, full logits, two forwards."""
    seqs = [(it["chosen_input_ids"], it["chosen_labels"]) for it in items] + \
           [(it["rejected_input_ids"], it["rejected_labels"]) for it in items]
    width = max(len(i) for i, _ in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, (i, lab) in enumerate(seqs):
        ids[r, :len(i)], labels[r, :len(lab)], mask[r, :len(i)] = i, lab, 1
    pix = torch.cat([it["pixel_values"] for it in items] * 2).to(device)
    ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)

    def logps(m):
        logits = m(input_ids=ids, attention_mask=mask, pixel_values=pix, use_cache=False).logits[:, :-1].float()
        target = labels[:, 1:]
        valid = target != -100
        lp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
        return (lp * valid).sum(-1), valid.sum(-1), logits

    pol, n, logits = logps(model)
    with torch.no_grad(), model.disable_adapter():
        ref, _, _ = logps(model)
    k = len(items)
    nll = F.cross_entropy(logits[:k].reshape(-1, logits.shape[-1]), labels[:k, 1:].reshape(-1), ignore_index=-100)
    pc, pr, rc, rr = pol[:k], pol[k:], ref[:k], ref[k:]
    rewards = torch.cat([BETA * (pc - rc), BETA * (pr - rr)]).detach()
    running.append(float(rewards.mean()))
    delta = sum(running) / len(running)
    sig = -F.logsigmoid(BETA * ((pc - pr) - (rc - rr)))
    bco = -F.logsigmoid(BETA * (pc - rc) - delta) - F.logsigmoid(-(BETA * (pr - rr) - delta))
    return (WEIGHTS[0] * sig + WEIGHTS[1] * bco).mean() + WEIGHTS[2] * nll


def run(size, mode, n_pairs, steps, max_tiles, ckpt, device):
    from internvl_lora.config import TrainArgs
    from internvl_lora.data.collate import HostSide, PackedCollator, PreferenceCollator
    from internvl_lora.train.preference import PreferenceObjective
    from internvl_lora.train.speed import register_varlen_attention, speed_options

    model, cfg = build(size, "sdpa", device)
    if mode == "ours":
        if device == "cuda":
            model.base_model.model.set_attn_implementation({"text_config": register_varlen_attention()})
        speed_options(model, TrainArgs(gradient_checkpointing=bool(ckpt)), before_adapters=False, sharded=False)
        objective = PreferenceObjective(model, BETA, *WEIGHTS)
        collate = HostSide(PreferenceCollator(PackedCollator()))
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-5)
    rng = random.Random(0)
    groups = [pairs(n_pairs, rng, max_tiles) for _ in range(steps + 3)]
    running: list[float] = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0, tokens = None, 0
    for k, g in enumerate(groups):
        if k == 3:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        items = features(g, device)
        if mode == "naive":
            loss = naive_step(model, items, device, running)
        else:
            batch = collate(items)
            batch = {key: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
            loss = objective(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if k >= 3:
            tokens += sum(len(p) * 2 + len(c) + len(r) for p, c, r, _ in g)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return dict(size=size, mode=mode, pairs=n_pairs, grad_ckpt=ckpt, steps=steps, tokens_per_s=round(tokens / dt),
                peak_gib=round(peak, 1) if peak else None, loss=round(float(loss), 3))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="8b")
    ap.add_argument("--modes", default="naive,ours")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-tiles", type=int, default=6)
    ap.add_argument("--ckpt", type=int, default=None, help="activation checkpointing (default: naive 1, ours 0)")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for s in a.sizes.split(","):
        for m in a.modes.split(","):
            ckpt = a.ckpt if a.ckpt is not None else int(m == "naive")
            try:
                r = run(s, m, a.pairs, a.steps, a.max_tiles, ckpt, dev)
            except torch.cuda.OutOfMemoryError as e:  # the row says so; the other modes still run
                r = dict(size=s, mode=m, error=f"out of memory: {str(e)[:200]}")
            print(json.dumps(r), flush=True)
            if dev == "cuda":
                torch.cuda.empty_cache()
