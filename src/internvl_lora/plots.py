"""The training loss curve, in one place: `loss_curve_svg` (inline SVG for the self-contained HTML
report, no dependency) and `plot_loss_curve` (``loss_curve.png`` in a run folder, train and eval loss,
drawn with matplotlib).

    python -m internvl_lora.plots METRICS.jsonl OUT.png     # what training runs in a child process at a save
"""

from __future__ import annotations

import html
import math
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Most points drawn on the loss curve; longer curves are thinned evenly (the last point is kept).
MAX_CURVE_POINTS = 2000


def _e(x: Any) -> str:
    """Escape anything for HTML text or a quoted attribute."""
    return html.escape("" if x is None else str(x), quote=True)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) inside [lo, hi]."""
    span = hi - lo
    if span <= 0 or not math.isfinite(span):
        return [lo]
    raw = span / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, k = [], 0
    while first + k * step <= hi + step * 1e-9:
        ticks.append(first + k * step)
        k += 1
    return ticks


def _tick_label(v: float, step: float) -> str:
    if abs(v) < step * 1e-6:
        v = 0.0
    if step >= 1 and float(v).is_integer():
        return f"{int(v)}"
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 2
    return f"{v:.{min(decimals, 6)}f}"


def loss_curve_svg(loss_curve: Sequence[tuple[int, float]]) -> str:
    pts: list[tuple[float, float]] = []
    for item in loss_curve:
        try:
            x, y = float(item[0]), float(item[1])
        except (TypeError, ValueError, IndexError):
            continue
        if math.isfinite(x) and math.isfinite(y):
            pts.append((x, y))
    if not pts:
        return '<p class="sub">The loss curve has no finite points.</p>'
    pts.sort(key=lambda p: p[0])
    drawn = pts
    if len(pts) > MAX_CURVE_POINTS:
        stride = len(pts) / MAX_CURVE_POINTS
        drawn = [pts[int(i * stride)] for i in range(MAX_CURVE_POINTS - 1)] + [pts[-1]]

    W, H, L, R, T, B = 760, 320, 70, 20, 14, 50
    pw, ph = W - L - R, H - T - B
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.05 if y1 > y0 else (abs(y0) * 0.05 or 1.0)
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return L + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return T + (1 - (y - y0) / (y1 - y0)) * ph

    g: list[str] = []
    xt, yt = _nice_ticks(x0, x1, 7), _nice_ticks(y0, y1, 6)
    xstep = xt[1] - xt[0] if len(xt) > 1 else 1.0
    ystep = yt[1] - yt[0] if len(yt) > 1 else 1.0
    for v in yt:
        y = sy(v)
        g.append(f'<line x1="{L}" y1="{y:.1f}" x2="{L + pw}" y2="{y:.1f}" stroke="#eaeef2"/>')
        g.append(f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{_e(_tick_label(v, ystep))}</text>')
    for v in xt:
        x = sx(v)
        g.append(f'<line x1="{x:.1f}" y1="{T + ph}" x2="{x:.1f}" y2="{T + ph + 5}" stroke="#57606a"/>')
        g.append(f'<text x="{x:.1f}" y="{T + ph + 19}" text-anchor="middle">{_e(_tick_label(v, xstep))}</text>')
    g.append(f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#57606a"/>')
    if len(drawn) == 1:
        g.append(f'<circle cx="{sx(drawn[0][0]):.1f}" cy="{sy(drawn[0][1]):.1f}" r="4" fill="#0969da"/>')
    else:
        poly = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in drawn)
        g.append(f'<polyline points="{poly}" fill="none" stroke="#0969da" stroke-width="2" stroke-linejoin="round"/>')
    g.append(f'<text x="{L + pw / 2:.1f}" y="{H - 8}" text-anchor="middle" class="axis">step</text>')
    g.append(f'<text x="16" y="{T + ph / 2:.1f}" text-anchor="middle" class="axis" '
             f'transform="rotate(-90 16 {T + ph / 2:.1f})">loss</text>')
    svg = (
        f'<svg id="loss-curve" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" '
        f'aria-label="training loss against step" font-size="12" fill="#1f2328" '
        f'font-family="DejaVu Sans, sans-serif"><style>.axis {{ font-size: 13px; font-weight: 600; }}</style>'
        f'{"".join(g)}</svg>'
    )
    first, last = pts[0], pts[-1]
    best = min(pts, key=lambda p: p[1])
    caption = (
        f"{len(pts)} points; first {_tick_label(first[1], 1e-4)} (step {_fmt_step(first[0])}), "
        f"last {_tick_label(last[1], 1e-4)} (step {_fmt_step(last[0])}), "
        f"min {_tick_label(best[1], 1e-4)} (step {_fmt_step(best[0])})"
    )
    return f'<div class="curve">{svg}<p class="sub">{_e(caption)}</p></div>'


def _fmt_step(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"



def plot_loss_curve(history: list[dict], path: str | Path) -> Path | None:
    """Write a loss-curve PNG (train and eval loss against steps). Written to a temporary file first.
    matplotlib's object API (no pyplot, no backend switch): nothing process-wide changes."""
    train = [(r["step"], r["loss"]) for r in history if isinstance(r.get("loss"), (int, float))]
    evals = [(r["step"], r["eval_loss"]) for r in history if isinstance(r.get("eval_loss"), (int, float))]
    if not train and not evals:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    """Draw OUT.png from the records of a metrics.jsonl (blank lines skipped)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m internvl_lora.plots METRICS.jsonl OUT.png", file=sys.stderr)
        return 2
    metrics, out = argv
    history = []
    with open(metrics, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    history.append(json.loads(line))
                except json.JSONDecodeError as e:
                    print(f"{metrics}:{n}: not a JSON record ({e.msg})", file=sys.stderr)
                    return 1
    plot_loss_curve(history, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
