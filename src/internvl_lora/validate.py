"""Compare a tuned model against its base on held-out samples.

    internvl-lora validate --base BASE --tuned TUNED --data HELDOUT [--out DIR] [--blank-images]

BASE / TUNED: checkpoint folders of either format, or an adapter folder (applied to its base).
HELDOUT: a meta file or a .jsonl in the official format; for each sample the last question is asked
(earlier turns given as history, images attached where the sample puts them) and the answer is compared
with the last reference answer. Generation is greedy and batched with left padding (the answers equal
those of batch size 1; tests/test_validate.py checks it).
Writes `validation.json` (per sample and overall exact match, ANLS, ROUGE-L; with --blank-images also each
sample's `blank_answer` / `blank_score`, the tuned model's answer with the images blanked) and a self-contained
`report.html` (summary, per-sample images / question / reference / both answers marked right or wrong,
and the training loss curve when the run folder can be found).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .data.heldout import heldout_samples
from .data.meta import load_meta, read_lines
from .errors import UserError
from .infer import Loaded, build_inputs, generate, load_for_inference
from .ranking import pair_logps, ranking_summary, reward_accuracy
from .run_dir import RUN_META
from .metrics import aggregate, score


def answer_all(loaded: Loaded, samples: list[dict], batch_size: int, max_new_tokens: int, blank: bool,
               desc: str) -> list[str]:
    """Greedy answers, `batch_size` samples at a time (left padding); a progress bar on stderr."""
    answers: list[str] = []
    with tqdm(total=len(samples), desc=desc, unit="sample", file=sys.stderr, leave=False) as bar:
        for start in range(0, len(samples), max(1, batch_size)):
            chunk = samples[start:start + max(1, batch_size)]
            batch = []
            for s in chunk:
                try:
                    batch.append(build_inputs(s["question"], s["images"], loaded.settings, loaded.tokenizer,
                                              s["history"], s["system"], blank=blank))
                except UserError as e:
                    raise UserError(f"{s['source']}: {e}") from None
            answers += generate(loaded, batch, max_new_tokens)
            bar.update(len(chunk))
    return answers


def evaluate(model_path: str | Loaded, samples: list[dict], batch_size: int = 8, max_new_tokens: int = 32,
             blank: bool = False, desc: str = "model") -> tuple[list[str], list[dict], dict]:
    loaded = model_path if isinstance(model_path, Loaded) else load_for_inference(model_path)
    answers = answer_all(loaded, samples, batch_size, max_new_tokens, blank, desc)
    scores = [score(a, s["reference"]) for a, s in zip(answers, samples)]
    return answers, scores, aggregate(scores)


def run_folder_of(tuned: str | Path) -> Path | None:
    """The training run folder a tuned model came from: RUN for an adapter folder RUN/adapter (or a
    checkpoint RUN/checkpoint-N), and the adapter's run for a merged folder (`merged_from` in its
    internvl_lora.json). None when no metrics.jsonl is found."""
    tuned = Path(tuned)
    candidates = [tuned, tuned.parent]
    meta_file = tuned / RUN_META
    if meta_file.exists():
        try:
            merged_from = json.loads(meta_file.read_text()).get("merged_from")
        except (OSError, json.JSONDecodeError):
            merged_from = None
        if merged_from:
            candidates = [Path(merged_from), Path(merged_from).parent] + candidates
    for folder in candidates:
        if (folder / "metrics.jsonl").is_file():
            return folder
    return None


def loss_curve_of(tuned: str | Path) -> list[tuple[int, float]] | None:
    """The training loss curve of the run the tuned model came from (see `run_folder_of`); on a resumed
    run the last value logged for a step wins."""
    run = run_folder_of(tuned)
    if run is None:
        return None
    by_step: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interrupted run
        if isinstance(row, dict) and "loss" in row and "step" in row:
            by_step[int(row["step"])] = float(row["loss"])
    return sorted(by_step.items()) or None


def _pair_lines(lines, samples: list[dict]) -> list:
    """The annotation line of each sample, in order, when the samples are preference pairs; [] otherwise."""
    if not samples or "rejected" not in samples[0]:
        return []
    by_index = {}
    for ln in lines:
        by_index.setdefault(ln.index, ln)
    return [by_index[s["index"]] for s in samples]


def _add_ranking(summary: dict, ranks: dict) -> None:
    """Each model's ranking accuracy and mean log-probability margin, and the tuned model's reward accuracy
    against the base, into the summary's model rows."""
    rows = {"base": "base", "tuned": "tuned", "blank": "tuned, images blanked"}
    for model, logps in ranks.items():
        r = ranking_summary(logps)
        summary[rows[model]].update(ranking_accuracy=r["ranking_accuracy"], mean_margin=r["mean_margin"])
    summary["tuned"]["reward_accuracy"] = reward_accuracy(ranks["tuned"], ranks["base"])


def validate(base: str, tuned: str, data: str, out_dir: str, batch_size: int = 8, max_new_tokens: int = 32,
             limit: int | None = None, blank_images: bool = False) -> dict:
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    t0 = time.time()
    lines = read_lines(load_meta(data))
    samples, problems = heldout_samples(lines, limit)
    if not samples:
        raise UserError(f"{data}: no valid held-out sample" + (f" ({len(problems)} with problems)" if problems else ""))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = _pair_lines(lines, samples)  # preference data: the lines whose chosen / rejected get ranked
    base_loaded = load_for_inference(base)
    base_answers, base_scores, base_summary = evaluate(base_loaded, samples, batch_size, max_new_tokens, False, "base")
    ranks = {"base": pair_logps(base_loaded, pairs, desc="base pairs")} if pairs else {}
    del base_loaded
    tuned_loaded = load_for_inference(tuned)
    tuned_answers, tuned_scores, tuned_summary = evaluate(tuned_loaded, samples, batch_size, max_new_tokens, False,
                                                          "tuned")
    summary = {"base": base_summary, "tuned": tuned_summary}
    blank_answers = blank_scores = None
    if blank_images:
        blank_answers, blank_scores, summary["tuned, images blanked"] = evaluate(
            tuned_loaded, samples, batch_size, max_new_tokens, True, "blank")
    if pairs:
        ranks["tuned"] = pair_logps(tuned_loaded, pairs, desc="tuned pairs")
        if blank_images:
            ranks["blank"] = pair_logps(tuned_loaded, pairs, blank=True, desc="blank pairs")
        _add_ranking(summary, ranks)
    del tuned_loaded
    summary["samples"] = len(samples)
    summary["skipped (problems)"] = len(problems)
    summary["base model"] = str(base)
    summary["tuned model"] = str(tuned)
    summary["data"] = str(data)
    summary["max_new_tokens"] = max_new_tokens
    summary["seconds"] = round(time.time() - t0, 1)
    rows = []
    for i, (s, ba, bs, ta, ts) in enumerate(zip(samples, base_answers, base_scores, tuned_answers, tuned_scores)):
        rows.append({**s, "base_answer": ba, "base_score": bs, "tuned_answer": ta, "tuned_score": ts})
        if blank_answers is not None:  # what the tuned model answers without seeing the images
            rows[-1].update(blank_answer=blank_answers[i], blank_score=blank_scores[i])
        for model, logps in ranks.items():  # preference pairs: log p(chosen), log p(rejected) per model
            rows[-1][f"{model}_logps"] = list(logps[i])
    (out / "validation.json").write_text(json.dumps(
        {"summary": summary, "problems": [str(p) for p in problems], "samples": rows}, indent=2, ensure_ascii=False) + "\n")
    from .report import render_report

    render_report(out / "report.html", summary, rows, loss_curve_of(tuned))
    return summary
