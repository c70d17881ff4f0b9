"""Self-contained HTML validation report: summary table, loss curve, per-sample answers.

:func:`render_report` writes one ``report.html`` that needs nothing else: CSS is inline, images are
embedded as base64 JPEG thumbnails (thumbnails.py), the loss curve is an inline SVG (plots.py), there is no
JavaScript and no external URL. Open it from disk, attach it to a ticket, or copy it anywhere.

Inputs
------
``summary``
    A dict. Every value that is itself a dict is a *model* row of the summary table (``"base"`` and
    ``"tuned"`` first, then any others in insertion order), e.g. ``{"exact_match": 0.4, "anls": 0.6,
    "rouge_l": 0.5, "count": 20}`` as :func:`internvl_lora.metrics.aggregate` returns. Every other
    key is an *extra* shown in a key/value table (``num_samples``, ``seconds``, ``checkpoint``...).
    When ``base``/``tuned`` is missing but the samples carry that model's answers, its row is
    computed from the samples.
``samples``
    A list of dicts with keys ``index``, ``images`` (list of file paths), ``question``,
    ``reference`` (a string or a list of acceptable answers), ``base_answer``, ``tuned_answer`` and
    optionally ``base_score`` / ``tuned_score`` (dicts as :func:`internvl_lora.metrics.score`
    returns); ``blank_answer`` / ``blank_score`` (the tuned model with the images blanked) add a row. An answer is marked right (green ✓) or wrong (red ✗) by exact match, taken from the
    score dict when present, else computed. Missing or unreadable images show a placeholder with
    the path; nothing about one sample can stop the report from being written.
``loss_curve``
    Optional ``[(step, loss), ...]``; non-finite points are skipped.
"""

from __future__ import annotations

import html
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import metrics
from .plots import loss_curve_svg
from .thumbnails import THUMB_MAX_PX, Thumbs

__all__ = ["render_report"]

_MODEL_ORDER = ("base", "tuned")
_METRIC_LABELS = {"exact_match": "Exact match", "anls": "ANLS", "rouge_l": "ROUGE-L", "count": "Count",
                  "ranking_accuracy": "Chosen ranked first", "mean_margin": "log p margin",
                  "reward_accuracy": "Reward accuracy vs base"}
# Badge colours; tests/test_report.py looks for solid patches of these two in the screenshot.
GREEN = "#1a7f37"
RED = "#cf222e"

_CSS = f"""
:root {{ --ok: {GREEN}; --bad: {RED}; --muted: #57606a; --line: #d0d7de; --bg: #f6f8fa; }}
* {{ box-sizing: border-box; }}
body {{ font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", "Liberation Sans", sans-serif;
       margin: 0 auto; padding: 24px; max-width: 1150px; color: #1f2328; background: #fff;
       font-size: 15px; line-height: 1.45; }}
h1 {{ font-size: 26px; margin: 0 0 4px; }}
h2 {{ font-size: 19px; margin: 28px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }}
.sub {{ color: var(--muted); margin: 0 0 8px; }}
table {{ border-collapse: collapse; }}
table.grid th, table.grid td {{ border: 1px solid var(--line); padding: 5px 10px; text-align: left; }}
table.grid th {{ background: var(--bg); font-weight: 600; }}
table.grid td.num {{ text-align: right; font-variant-numeric: tabular-nums; font-family: "DejaVu Sans Mono", monospace; }}
.row-flex {{ display: flex; gap: 28px; flex-wrap: wrap; align-items: flex-start; }}
.pos {{ color: var(--ok); font-weight: 600; }}
.neg {{ color: var(--bad); font-weight: 600; }}
.curve svg {{ background: #fff; border: 1px solid var(--line); }}
.sample {{ border: 1px solid var(--line); border-left: 6px solid var(--line); border-radius: 6px;
          padding: 10px 14px; margin: 0 0 14px; display: flex; gap: 16px; break-inside: avoid; }}
.sample.fixed {{ border-left-color: var(--ok); }}
.sample.broken {{ border-left-color: var(--bad); }}
.sample .imgs {{ display: flex; flex-wrap: wrap; gap: 6px; flex: 0 0 {2 * THUMB_MAX_PX + 8}px;
                align-content: flex-start; }}
.sample figure {{ margin: 0; }}
.sample img {{ display: block; border: 1px solid var(--line); max-width: {THUMB_MAX_PX}px; max-height: {THUMB_MAX_PX}px; }}
.sample figcaption {{ font-size: 11px; color: var(--muted); max-width: {THUMB_MAX_PX}px; overflow-wrap: anywhere; }}
.missing {{ width: {THUMB_MAX_PX}px; min-height: 90px; border: 2px dashed var(--bad); background: #fff5f5;
           font-size: 12px; padding: 6px; overflow-wrap: anywhere; color: #6e2a2a; }}
.noimg {{ color: var(--muted); font-style: italic; }}
.qa {{ flex: 1 1 auto; min-width: 0; }}
.qa h3 {{ margin: 0 0 6px; font-size: 15px; }}
.qa table {{ width: 100%; }}
.qa th {{ width: 120px; white-space: nowrap; vertical-align: top; text-align: left; color: var(--muted); font-weight: 600; padding: 3px 8px 3px 0; }}
.qa td {{ padding: 3px 0; vertical-align: top; }}
.txt {{ white-space: pre-wrap; overflow-wrap: anywhere; }}
.ref {{ background: var(--bg); border-radius: 4px; padding: 0 4px; }}
.badge {{ display: inline-block; min-width: 26px; height: 24px; line-height: 24px; border-radius: 5px;
         text-align: center; color: #fff; font-weight: 700; font-size: 16px; margin-right: 8px;
         vertical-align: top; }}
.badge.ok {{ background: var(--ok); }}
.badge.bad {{ background: var(--bad); }}
.badge.unk {{ background: #8c959f; }}
.scores {{ color: var(--muted); font-size: 12px; margin-left: 6px; white-space: nowrap; }}
.tag {{ font-size: 12px; font-weight: 600; border-radius: 10px; padding: 1px 8px; margin-left: 8px; }}
.tag.fixed {{ background: #dafbe1; color: #116329; }}
.tag.broken {{ background: #ffebe9; color: #a40e26; }}
"""


# ----------------------------------------------------------------------------------------- helpers


def _e(x: Any) -> str:
    """Escape anything for HTML text or a quoted attribute."""
    return html.escape("" if x is None else str(x), quote=True)


def _fmt(v: Any) -> str:
    """Format a summary value: floats with 4 decimals (1 above 100), ints as-is, None/NaN as '—'."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "—"
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _sample_images(sample: Mapping[str, Any]) -> list[Any]:
    imgs = sample.get("images")
    if imgs is None:
        return []
    if isinstance(imgs, (str, os.PathLike)):
        return [imgs]
    try:
        return list(imgs)
    except TypeError:
        return [imgs]


def _has_reference(ref: Any) -> bool:
    if ref is None:
        return False
    if isinstance(ref, str):
        return True
    try:
        return len(ref) > 0
    except TypeError:
        return False


def _answer_scores(sample: Mapping[str, Any], model: str) -> dict[str, float] | None:
    """The model's score dict for this sample: given ``<model>_score`` entries, computed for the rest.

    None when there is no answer key or nothing to score against.
    """
    if f"{model}_answer" not in sample:
        return None
    given = sample.get(f"{model}_score")
    out: dict[str, float] = {}
    if isinstance(given, Mapping):
        for k, v in given.items():
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                pass
    if all(k in out for k in metrics.METRICS):
        return out
    ref = sample.get("reference")
    if not _has_reference(ref):
        return out or None
    try:
        computed = metrics.score(sample.get(f"{model}_answer"), ref if isinstance(ref, str) else [str(r) for r in ref])
    except Exception:
        return out or None
    computed.update(out)
    return computed


def _is_right(scores: Mapping[str, float] | None) -> bool | None:
    if not scores or "exact_match" not in scores or not math.isfinite(scores["exact_match"]):
        return None
    return scores["exact_match"] >= 0.999


# ----------------------------------------------------------------------------------------- summary


def _model_rows(summary: Mapping[str, Any], samples: Sequence[Mapping[str, Any]], per_sample) -> list[tuple[str, dict, bool]]:
    """(name, stats, computed_here) for every model row, base and tuned first."""
    models = {k: dict(v) for k, v in summary.items() if isinstance(v, Mapping)}
    computed: set[str] = set()
    for m in _MODEL_ORDER:
        if m not in models:
            rows = [s[m] for s in per_sample if s.get(m) is not None]
            if rows:
                models[m] = metrics.aggregate(rows)
                computed.add(m)
    order = [m for m in _MODEL_ORDER if m in models] + [m for m in models if m not in _MODEL_ORDER]
    return [(m, models[m], m in computed) for m in order]


def _summary_html(summary: Mapping[str, Any], samples, per_sample) -> str:
    rows = _model_rows(summary, samples, per_sample)
    parts: list[str] = []
    if rows:
        cols: list[str] = [k for k in metrics.METRICS if any(k in st for _, st, _ in rows)]
        if any("count" in st for _, st, _ in rows):
            cols.append("count")
        for _, st, _ in rows:
            cols += [k for k in st if k not in cols]
        head = "".join(f"<th>{_e(_METRIC_LABELS.get(c, c))}</th>" for c in cols)
        body = []
        for name, st, was_computed in rows:
            note = ' <span class="sub">(from samples)</span>' if was_computed else ""
            cells = "".join(f'<td class="num">{_e(_fmt(st.get(c)))}</td>' for c in cols)
            body.append(f"<tr><th>{_e(name)}{note}</th>{cells}</tr>")
        stats = {name: st for name, st, _ in rows}
        if "base" in stats and "tuned" in stats:
            cells = []
            for c in cols:
                b, t = stats["base"].get(c), stats["tuned"].get(c)
                if c != "count" and isinstance(b, (int, float)) and isinstance(t, (int, float)) \
                        and not isinstance(b, bool) and not isinstance(t, bool) and math.isfinite(b) and math.isfinite(t):
                    d = float(t) - float(b)
                    cls = "pos" if d > 0 else ("neg" if d < 0 else "")
                    cells.append(f'<td class="num {cls}">{d:+.4f}</td>')
                else:
                    cells.append('<td class="num"></td>')
            body.append(f"<tr><th>Δ tuned − base</th>{''.join(cells)}</tr>")
        parts.append(
            f'<table class="grid" id="summary"><thead><tr><th>Model</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>"
        )
    extras = [(k, v) for k, v in summary.items() if not isinstance(v, Mapping)]
    side: list[str] = []
    if extras:
        trs = "".join(f'<tr><th>{_e(k)}</th><td class="num">{_e(_fmt(v))}</td></tr>' for k, v in extras)
        side.append(f'<table class="grid" id="extras"><tbody>{trs}</tbody></table>')
    # Per-sample outcome tally (exact match), when both models were scored.
    tally = {"both right": 0, "fixed by tuning": 0, "broken by tuning": 0, "both wrong": 0}
    n_pairs = 0
    for s in per_sample:
        b, t = _is_right(s.get("base")), _is_right(s.get("tuned"))
        if b is None or t is None:
            continue
        n_pairs += 1
        key = ("both right" if t else "broken by tuning") if b else ("fixed by tuning" if t else "both wrong")
        tally[key] += 1
    if n_pairs:
        trs = "".join(f'<tr><th>{_e(k)}</th><td class="num">{v}</td></tr>' for k, v in tally.items())
        side.append(f'<table class="grid" id="outcomes"><thead><tr><th colspan="2">Per-sample (exact match)</th></tr>'
                    f"</thead><tbody>{trs}</tbody></table>")
    if side:
        parts.append("".join(side))
    if not parts:
        return '<p class="sub">No summary given.</p>'
    return f'<div class="row-flex">{"".join(parts)}</div>'


def _text(v: Any) -> str:
    return f'<span class="txt">{_e(v)}</span>'


def _reference_html(ref: Any) -> str:
    if ref is None:
        return '<span class="sub">(no reference)</span>'
    if isinstance(ref, str):
        return f'<span class="txt ref">{_e(ref)}</span>'
    try:
        refs = list(ref)
    except TypeError:
        return f'<span class="txt ref">{_e(ref)}</span>'
    if not refs:
        return '<span class="sub">(no reference)</span>'
    if len(refs) == 1:
        return f'<span class="txt ref">{_e(refs[0])}</span>'
    return '<span class="sub">any of:</span> ' + " ".join(f'<span class="txt ref">{_e(r)}</span>' for r in refs)


def _answer_html(sample: Mapping[str, Any], model: str, scores: Mapping[str, float] | None) -> str:
    ans = sample.get(f"{model}_answer")
    right = _is_right(scores)
    if right is True:
        badge = '<span class="badge ok" title="right (exact match)">✓</span>'
    elif right is False:
        badge = '<span class="badge bad" title="wrong (exact match)">✗</span>'
    else:
        badge = '<span class="badge unk" title="not scored">?</span>'
    text = _text(ans) if ans is not None else '<span class="sub">(no answer)</span>'
    extra = ""
    if scores:
        bits = [f"{_METRIC_LABELS[k]} {scores[k]:.2f}" for k in ("anls", "rouge_l") if k in scores]
        if bits:
            extra = f'<span class="scores">{_e(" · ".join(bits))}</span>'
    return f"{badge}{text}{extra}"


def _sample_html(i: int, sample: Mapping[str, Any], scores: Mapping[str, Any], thumbs: Thumbs) -> str:
    idx = sample.get("index", i)
    paths = _sample_images(sample)
    imgs = "".join(thumbs.html(p) for p in paths) or '<span class="noimg">no image</span>'
    b, t = _is_right(scores.get("base")), _is_right(scores.get("tuned"))
    outcome, tag = "", ""
    if b is False and t is True:
        outcome, tag = "fixed", '<span class="tag fixed">fixed by tuning</span>'
    elif b is True and t is False:
        outcome, tag = "broken", '<span class="tag broken">broken by tuning</span>'
    rows = [
        f"<tr><th>Question</th><td>{_text(sample.get('question'))}</td></tr>",
        f"<tr><th>{'Chosen' if 'rejected' in sample else 'Reference'}</th>"
        f"<td>{_reference_html(sample.get('reference'))}</td></tr>",
    ]
    if "rejected" in sample:  # a preference pair: the rejected answer, and how each model ranks the two
        rows.append(f"<tr><th>Rejected</th><td>{_text(sample['rejected'])}</td></tr>")
        ranked = []
        for model, label in (("base", "base"), ("tuned", "tuned"), ("blank", "blank images")):
            logps = sample.get(f"{model}_logps")
            if logps:
                ranked.append(f"{label} {logps[0] - logps[1]:+.2f}")
        if ranked:
            rows.append(f'<tr><th>log p chosen − rejected</th><td><span class="scores">{_e(" · ".join(ranked))}'
                        "</span></td></tr>")
    for model, label in (("base", "Base answer"), ("tuned", "Tuned answer"), ("blank", "Tuned, images blanked")):
        if f"{model}_answer" in sample or f"{model}_score" in sample:
            rows.append(f'<tr class="{model}"><th>{label}</th><td>{_answer_html(sample, model, scores.get(model))}</td></tr>')
    return (
        f'<section class="sample {outcome}" id="sample-{_e(idx)}">'
        f'<div class="imgs">{imgs}</div>'
        f'<div class="qa"><h3>Sample {_e(idx)}{tag}</h3><table>{"".join(rows)}</table></div>'
        f"</section>"
    )


# ------------------------------------------------------------------------------------------ public


def render_report(
    out_path: str | os.PathLike,
    summary: dict,
    samples: list[dict],
    loss_curve: list[tuple[int, float]] | None = None,
    title: str = "internvl-lora validation",
) -> Path:
    """Write the self-contained HTML report and return its path.

    ``out_path`` is the file to write, or an existing directory (then ``report.html`` inside it).
    Parent directories are created; the file is replaced atomically. See the module docstring for
    the shape of ``summary``, ``samples`` and ``loss_curve``.
    """
    out = Path(out_path)
    if out.is_dir():
        out = out / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)

    summary = dict(summary or {})
    samples = list(samples or [])
    per_sample = [{m: _answer_scores(s, m) for m in _MODEL_ORDER + ("blank",)} for s in samples]
    thumbs = Thumbs()

    body: list[str] = [f"<h1>{_e(title)}</h1>"]
    body.append(f'<p class="sub">{len(samples)} sample(s). Answers are marked '
                f'<span class="pos">✓ right</span> or <span class="neg">✗ wrong</span> by exact match '
                f"after normalization (lowercase, collapsed whitespace, trailing punctuation dropped).</p>")
    body.append("<h2>Summary</h2>")
    body.append(_summary_html(summary, samples, per_sample))
    if loss_curve is not None:
        body.append("<h2>Training loss</h2>")
        body.append(loss_curve_svg(loss_curve))
    body.append("<h2>Samples</h2>")
    if samples:
        body.extend(_sample_html(i, s, sc, thumbs) for i, (s, sc) in enumerate(zip(samples, per_sample)))
    else:
        body.append('<p class="sub">No samples.</p>')

    doc = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".html", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(doc)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a report is meant to be shared
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return out
