"""Preference ranking on held-out pairs: the log-probability a model gives the chosen and the rejected
answer of each pair, tokenized and tiled exactly as training does (`data.preference.encode_preference`).

Used by `validate` on preference data: how often a model ranks the chosen answer above the rejected
one (its ranking accuracy), and how often the tuned model's rewards beta * (log p_tuned - log p_base)
rank them so (the reward accuracy that training logs, measured against the base model).
"""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from .data.preference import encode_preference, parse_preference
from .internvl.constants import IGNORE_INDEX


def _answer_logp(model, ids: list[int], labels: list[int], pixels, device) -> float:
    """Sum of log p(token) over the trained (answer) tokens of one sequence, the model's own forward."""
    ids_t = torch.tensor([ids], device=device)
    kw = {"pixel_values": pixels} if pixels is not None else {}
    with torch.no_grad():
        logits = model(input_ids=ids_t, use_cache=False, **kw).logits[0, :-1].float()
    target = torch.tensor(labels[1:], device=device)
    keep = target != IGNORE_INDEX
    logp = torch.log_softmax(logits[keep], -1).gather(-1, target[keep, None])
    return float(logp.sum())


def pair_logps(loaded, lines, blank: bool = False, desc: str = "pairs") -> list[tuple[float, float]]:
    """(log p(chosen), log p(rejected)) for each preference line, in order. `blank`: every tile white, as
    `validate --blank-images` does for generation (the ranking should then fall to chance)."""
    from .data.encode import normalize

    out = []
    with tqdm(total=len(lines), desc=desc, unit="pair", file=sys.stderr, leave=False) as bar:
        for ln in lines:
            enc = encode_preference(parse_preference(ln), loaded.tokenizer, loaded.settings)
            px = enc.pixel_values
            if px is not None:
                if blank:
                    px = normalize([torch.full(px.shape, 255, dtype=torch.uint8)], loaded.settings.normalize_type)
                px = px.to(loaded.device, loaded.dtype)
            out.append((_answer_logp(loaded.model, enc.chosen_ids, enc.chosen_labels, px, loaded.device),
                        _answer_logp(loaded.model, enc.rejected_ids, enc.rejected_labels, px, loaded.device)))
            bar.update(1)
    return out


def ranking_summary(logps: list[tuple[float, float]]) -> dict:
    """Ranking accuracy (chosen above rejected) and the mean log-probability margin."""
    n = max(1, len(logps))
    return {"ranking_accuracy": sum(c > r for c, r in logps) / n,
            "mean_margin": sum(c - r for c, r in logps) / n, "pairs": len(logps)}


def reward_accuracy(tuned: list[tuple[float, float]], base: list[tuple[float, float]]) -> float:
    """How often beta * (log p_tuned - log p_base) is higher for the chosen answer (any beta > 0)."""
    wins = sum((tc - bc) > (tr - br) for (tc, tr), (bc, br) in zip(tuned, base))
    return wins / max(1, len(tuned))
