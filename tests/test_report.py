"""Tests for internvl_lora.report: HTML content checks, and a real render in headless Chromium."""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from internvl_lora.report import GREEN, RED, render_report
from internvl_lora.thumbnails import THUMB_MAX_PX

QUESTIONS = [
    "What colour is the circle?",
    'Compare <b>both</b> images & say which is "darker"?',
    "Is there a missing image?",
    "Multi-line\nquestion with <script>alert(1)</script>?",
]


def _make_images(d: Path) -> dict[str, Path]:
    """Test images in colours far from the badge green/red."""
    paths = {}
    im = Image.new("RGB", (640, 400), (40, 60, 200))
    ImageDraw.Draw(im).ellipse((100, 50, 400, 350), fill=(250, 220, 80))
    paths["wide"] = d / "wide.jpg"
    im.save(paths["wide"])
    im = Image.new("RGB", (300, 900), (235, 235, 235))
    ImageDraw.Draw(im).rectangle((50, 50, 250, 300), fill=(20, 20, 20))
    paths["tall"] = d / "tall.jpg"
    im.save(paths["tall"])
    im = Image.new("RGBA", (200, 120), (0, 0, 0, 0))  # transparent PNG: composited on white
    ImageDraw.Draw(im).ellipse((20, 10, 110, 100), fill=(80, 200, 220, 255))
    paths["alpha"] = d / "alpha.png"
    im.save(paths["alpha"])
    paths["small"] = d / "small.png"
    Image.new("P", (40, 30), 3).save(paths["small"])
    paths["corrupt"] = d / "corrupt.jpg"
    paths["corrupt"].write_bytes(b"this is not a jpeg")
    return paths


def _fixture(d: Path):
    imgs = _make_images(d)
    samples = [
        dict(index=0, images=[str(imgs["wide"])], question=QUESTIONS[0], reference="yellow",
             base_answer="Blue.", tuned_answer="Yellow."),
        dict(index=1, images=[str(imgs["tall"]), str(imgs["alpha"])], question=QUESTIONS[1],
             reference=["the second", "second"], base_answer="The second one", tuned_answer="second"),
        dict(index=2, images=[str(d / "nope" / "missing.jpg"), str(imgs["corrupt"])], question=QUESTIONS[2],
             reference="yes", base_answer="yes", tuned_answer="no, there is <not>"),
        # given score dicts win over computed ones: the base answer is marked right although it differs
        dict(index=3, images=[str(imgs["small"]), str(imgs["wide"])], question=QUESTIONS[3], reference="a b c",
             base_answer="x y z", tuned_answer="A b c.",
             base_score={"exact_match": 1.0, "anls": 0.25, "rouge_l": 0.125}),
    ]
    summary = {
        "base": {"exact_match": 0.5, "anls": 0.678912, "rouge_l": 0.7, "count": 4},
        "tuned": {"exact_match": 0.75, "anls": 0.8125, "rouge_l": 0.8, "count": 4},
        "num_samples": 4,
        "seconds": 12.5,
        "checkpoint": "runs/<demo>/checkpoint-100",
    }
    loss = [(s, 2.5 * math.exp(-s / 60) + 0.3) for s in range(1, 201)] + [(201, float("nan"))]
    return summary, samples, loss, imgs


@pytest.fixture()
def rendered(tmp_path):
    summary, samples, loss, imgs = _fixture(tmp_path)
    out = render_report(tmp_path / "out" / "report.html", summary, samples, loss)
    return out, out.read_text(encoding="utf-8"), summary, samples


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tags, self.badges = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a)
        if tag == "span" and "badge" in (a.get("class") or "").split():
            self.badges.append(a["class"])


# ------------------------------------------------------------------------------------ content


def test_writes_one_self_contained_file(rendered):
    out, doc, _, _ = rendered
    assert out.name == "report.html" and out.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]  # no temp files, no assets
    assert doc.startswith("<!DOCTYPE html>")
    assert "http://" not in doc and "https://" not in doc
    assert "<script" not in doc  # the question's <script> is escaped, and there is no JS
    assert '<link' not in doc and "@import" not in doc and "url(" not in doc
    p = _Collector()
    p.feed(doc)
    assert all(i["src"].startswith("data:image/jpeg;base64,") for i in p.imgs)


def test_summary_numbers(rendered):
    _, doc, _, _ = rendered
    for v in ("0.5000", "0.6789", "0.7000", "0.7500", "0.8125", "0.8000", "12.5000"):
        assert v in doc, v
    assert re.search(r'<td class="num">4</td>', doc)  # counts / num_samples
    assert "num_samples" in doc and "seconds" in doc
    assert "runs/&lt;demo&gt;/checkpoint-100" in doc
    assert "+0.2500" in doc and "+0.1336" in doc  # tuned - base for exact_match and anls
    assert '<table class="grid" id="summary">' in doc


def test_questions_and_answers_escaped(rendered):
    _, doc, _, samples = rendered
    for s in samples:
        for key in ("question", "base_answer", "tuned_answer"):
            assert html.escape(s[key]) in doc, (key, s[key])
    assert "<b>both</b>" not in doc and "&lt;b&gt;both&lt;/b&gt;" in doc
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in doc
    assert "there is &lt;not&gt;" in doc
    assert "the second" in doc and "any of:" in doc  # list reference


def test_marks_right_and_wrong(rendered):
    _, doc, _, _ = rendered
    p = _Collector()
    p.feed(doc)
    # per sample (base, tuned): (✗, ✓), (✗, ✓), (✓, ✗), (✓ from given score, ✓ by normalization)
    assert p.badges == ["badge bad", "badge ok", "badge bad", "badge ok", "badge ok", "badge bad", "badge ok", "badge ok"]
    assert doc.count("✓</span>") >= 5 and doc.count("✗</span>") >= 3
    assert "ANLS 0.25" in doc  # the given score dict is shown as given
    assert 'class="sample fixed"' in doc and 'class="sample broken"' in doc


def test_thumbnails(rendered):
    _, doc, _, _ = rendered
    p = _Collector()
    p.feed(doc)
    # wide, tall, alpha, small, wide again (missing and corrupt are placeholders)
    assert len(p.imgs) == 5
    for a in p.imgs:
        data = base64.b64decode(a["src"].split(",", 1)[1])
        im = Image.open(io.BytesIO(data))
        assert im.format == "JPEG"
        assert max(im.size) <= THUMB_MAX_PX
        assert (int(a["width"]), int(a["height"])) == im.size
    sizes = [(int(a["width"]), int(a["height"])) for a in p.imgs]
    assert sizes[0] == (160, 100) and sizes[1] == (53, 160) and sizes[3] == (40, 30)  # small ones not upscaled
    # transparent background became white, not black
    alpha = Image.open(io.BytesIO(base64.b64decode(p.imgs[2]["src"].split(",", 1)[1]))).convert("RGB")
    assert min(alpha.getpixel((alpha.width - 2, alpha.height - 2))) > 230


def test_missing_and_unreadable_images(rendered, tmp_path):
    _, doc, _, _ = rendered
    assert "image not found" in doc and html.escape(str(tmp_path / "nope" / "missing.jpg")) in doc
    assert "image unreadable" in doc and html.escape(str(tmp_path / "corrupt.jpg")) in doc


def test_loss_curve(rendered):
    _, doc, _, _ = rendered
    m = re.search(r'<polyline points="([^"]+)"', doc)
    assert m and len(m.group(1).split()) == 200  # the NaN point is skipped
    assert ">step</text>" in doc and ">loss</text>" in doc
    assert "200 points" in doc


def test_loss_curve_edge_cases(tmp_path):
    one = render_report(tmp_path / "a.html", {}, [], [(5, 1.0)]).read_text()
    assert "<circle" in one and "<polyline" not in one
    flat = render_report(tmp_path / "b.html", {}, [], [(1, 0.5), (2, 0.5), (3, 0.5)]).read_text()
    assert "<polyline" in flat and "nan" not in flat.lower()
    none = render_report(tmp_path / "c.html", {}, [], [(1, float("inf"))]).read_text()
    assert "no finite points" in none and "<svg" not in none
    no_curve = render_report(tmp_path / "d.html", {}, [], None).read_text()
    assert "<svg" not in no_curve and "Training loss" not in no_curve
    many = render_report(tmp_path / "e.html", {}, [], [(i, 1 / (i + 1)) for i in range(10_000)]).read_text()
    assert len(re.search(r'<polyline points="([^"]+)"', many).group(1).split()) <= 2000


def test_summary_computed_from_samples_and_dir_output(tmp_path):
    samples = [
        dict(index=7, images=[], question="q1", reference="a", base_answer="a", tuned_answer="a"),
        dict(index=8, images=None, question="q2", reference="b", base_answer="c", tuned_answer="b"),
    ]
    out = render_report(tmp_path, {"seconds": 3}, samples)
    assert out == tmp_path / "report.html"
    doc = out.read_text()
    assert "(from samples)" in doc
    assert '<td class="num">0.5000</td>' in doc and '<td class="num">1.0000</td>' in doc  # base / tuned EM
    assert 'id="sample-7"' in doc and 'id="sample-8"' in doc and "no image" in doc


def test_odd_samples_do_not_crash(tmp_path):
    samples = [
        dict(question="no index, no images, no answers"),
        dict(index="x", images="not/a/list.png", question=None, reference=None, base_answer=None, tuned_answer="t"),
        dict(index=2, images=[123], question="q", reference=[], base_answer="a", tuned_answer=None),
        dict(index=3, images=[], question="q", reference=["x", None], base_answer="X", tuned_answer="y",
             base_score={"exact_match": "bad"}),
    ]
    doc = render_report(tmp_path / "r.html", {"base": {"exact_match": float("nan")}, "flag": True}, samples).read_text()
    assert "no, index" not in doc and "no index, no images, no answers" in doc
    assert "not/a/list.png" in doc and "(no answer)" in doc and "(no reference)" in doc
    assert "badge unk" in doc  # nothing to score against
    assert doc.count("<section") == 4


# ----------------------------------------------------------------------------------- chromium


def _chromium() -> str | None:
    return shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)


def _run_chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    exe = _chromium()
    profile = tmp / "profile"
    profile.mkdir(exist_ok=True)
    env = dict(os.environ, HOME=str(tmp), XDG_CONFIG_HOME=str(tmp / "cfg"), XDG_CACHE_HOME=str(tmp / "cache"))
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"chromium did not finish within 60 s: {' '.join(cmd)}\nstderr: {exc.stderr}")


def _has_solid_patch(rgb: np.ndarray, colour: str, size: int = 6, tol: int = 12) -> bool:
    """True if some size x size square of the image is entirely within tol of colour."""
    target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
    mask = (np.abs(rgb.astype(np.int16) - target) <= tol).all(axis=-1).astype(np.int32)
    integral = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    win = integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    return bool((win == size * size).any())


needs_chromium = pytest.mark.skipif(
    _chromium() is None, reason="Debian's chromium is not installed (run .ci/install-chromium.sh as root)"
)


@needs_chromium
def test_renders_in_headless_chromium(rendered, tmp_path):
    out, _, _, samples = rendered
    shot = tmp_path / "shot.png"
    proc = _run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", out.resolve().as_uri())
    assert shot.is_file(), f"no screenshot (rc={proc.returncode}); stderr tail:\n{proc.stderr[-2000:]}"
    im = Image.open(shot)
    assert im.size == (1200, 2000)
    rgb = np.asarray(im.convert("RGB"))
    colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200, "screenshot looks blank"
    # The report is white with dark text: most pixels near white, but far from all of them.
    light = (rgb.min(axis=-1) > 240).mean()
    assert 0.4 < light < 0.995, light
    # Solid green ✓ and red ✗ badges are rendered (the test images contain neither colour;
    # text in those colours is too thin to hold a solid 6x6 square).
    samples_top = 500  # the samples start below the title, summary and loss curve
    assert _has_solid_patch(rgb[samples_top:], GREEN), "no green ✓ badge in the screenshot"
    assert _has_solid_patch(rgb[samples_top:], RED), "no red ✗ badge in the screenshot"
    # The yellow circle of the first thumbnail is there too.
    assert _has_solid_patch(rgb, "#fadc50", size=8, tol=30), "first thumbnail not rendered"


@needs_chromium
def test_dom_in_headless_chromium(rendered, tmp_path):
    out, _, _, samples = rendered
    proc = _run_chromium(tmp_path, "--dump-dom", out.resolve().as_uri())
    dom = proc.stdout
    assert "<body" in dom, f"no DOM dumped (rc={proc.returncode}); stderr tail:\n{proc.stderr[-2000:]}"
    for s in samples:
        # the DOM serializer escapes &, <, > in text (not quotes)
        assert html.escape(s["question"], quote=False) in dom, s["question"]
    assert dom.count('class="badge ok"') == 5 and dom.count('class="badge bad"') == 3
    assert dom.count('src="data:image/jpeg;base64,') == 5
    assert "<script" not in dom
