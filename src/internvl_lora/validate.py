"""Compare a tuned model against its base on held-out samples.

    internvl-lora validate --base BASE --tuned TUNED --data HELDOUT [--out DIR] [--blank-images]

BASE / TUNED: checkpoint folders of either format, or an adapter folder (applied to its base).
HELDOUT: a meta file or a .jsonl in the official format; for each sample the last question is asked
(earlier turns given as history) and the answer is compared with the last reference answer.
Writes `validation.json` (per sample and overall exact match, ANLS, ROUGE-L) and a self-contained
`report.html`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from .chat import Loaded, build_inputs, generate, load_for_inference
from .data.audit import Problem
from .data.records import load_meta, parse_record, read_lines
from .errors import DataError, UserError
from .metrics import aggregate, score


def heldout_samples(data: str, limit: int | None = None) -> tuple[list[dict], list[Problem]]:
    """(question, history, images, reference) per valid held-out record; problems are returned, not hidden."""
    samples, problems = [], []
    for ln in read_lines(load_meta(data)):
        try:
            rec = parse_record(ln)
        except DataError as e:
            problems.append(Problem(e.kind, e.path, e.line, e.detail))
            continue
        if rec.video:
            problems.append(Problem("unsupported", ln.path, ln.line, "video samples are not validated yet"))
            continue
        turns = rec.turns
        history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 2, 2)]
        samples.append({"index": ln.index, "source": f"{ln.path}:{ln.line}", "question": turns[-2][1],
                        "history": history, "images": rec.images, "reference": turns[-1][1], "system": rec.system})
        if limit and len(samples) >= limit:
            break
    return samples, problems


def answer_all(loaded: Loaded, samples: list[dict], batch_size: int, max_new_tokens: int, blank: bool,
               desc: str) -> list[str]:
    answers: list[str] = []
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, unit="batch", leave=False):
        chunk = samples[start:start + batch_size]
        batch = [build_inputs(s["question"], s["images"], loaded.settings, loaded.tokenizer, s["history"],
                              s["system"], blank=blank) for s in chunk]
        answers += generate(loaded, batch, max_new_tokens)
    return answers


def evaluate(model_path: str, samples: list[dict], batch_size: int = 8, max_new_tokens: int = 32,
             blank: bool = False, desc: str = "model") -> tuple[list[str], list[dict], dict]:
    loaded = load_for_inference(model_path)
    answers = answer_all(loaded, samples, batch_size, max_new_tokens, blank, desc)
    scores = [score(a, s["reference"]) for a, s in zip(answers, samples)]
    return answers, scores, aggregate(scores)


def loss_curve_of(tuned: str) -> list[tuple[int, float]] | None:
    """The training loss curve, when the tuned model is an adapter folder inside a run folder."""
    for folder in (Path(tuned), Path(tuned).parent):
        f = folder / "metrics.jsonl"
        if f.exists():
            rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
            return [(r["step"], r["loss"]) for r in rows if "loss" in r]
    return None


def validate(base: str, tuned: str, data: str, out_dir: str, batch_size: int = 8, max_new_tokens: int = 32,
             limit: int | None = None, blank_images: bool = False) -> dict:
    t0 = time.time()
    samples, problems = heldout_samples(data, limit)
    if not samples:
        raise UserError(f"{data}: no valid held-out sample" + (f" ({len(problems)} with problems)" if problems else ""))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_answers, base_scores, base_summary = evaluate(base, samples, batch_size, max_new_tokens, False, "base")
    tuned_answers, tuned_scores, tuned_summary = evaluate(tuned, samples, batch_size, max_new_tokens, False, "tuned")
    summary = {"base": base_summary, "tuned": tuned_summary}
    if blank_images:
        _, _, summary["tuned, images blanked"] = evaluate(tuned, samples, batch_size, max_new_tokens, True, "blank")
    summary["samples"] = len(samples)
    summary["skipped (problems)"] = len(problems)
    summary["seconds"] = round(time.time() - t0, 1)
    rows = []
    for s, ba, bs, ta, ts in zip(samples, base_answers, base_scores, tuned_answers, tuned_scores):
        rows.append({**s, "base_answer": ba, "base_score": bs, "tuned_answer": ta, "tuned_score": ts})
    (out / "validation.json").write_text(json.dumps(
        {"summary": summary, "problems": [str(p) for p in problems], "samples": rows}, indent=2, ensure_ascii=False) + "\n")
    from .report import render_report

    render_report(out / "report.html", summary, rows, loss_curve_of(tuned))
    return summary
