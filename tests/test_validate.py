"""validate: batched left-padded generation equals batch size 1, the loss curve is found from an adapter
folder and from a merged folder, and the real report renders in headless Chromium."""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from internvl_lora.data.heldout import heldout_samples
from internvl_lora.data.meta import load_meta, read_lines
from internvl_lora.infer import build_inputs, load_for_inference
from internvl_lora.merge import merge
from internvl_lora.validate import evaluate, loss_curve_of, run_folder_of, validate


@pytest.fixture(scope="module")
def ws(tmp_path_factory, shared_run):
    d = shared_run
    adapter = d / "run" / "adapter"
    merged = tmp_path_factory.mktemp("validate") / "elsewhere" / "merged"  # found through `merged_from`
    merge(adapter, merged)
    samples, problems = heldout_samples(read_lines(load_meta(str(d / "data" / "heldout_meta.json"))))
    return SimpleNamespace(dir=d, base=d / "model", adapter=adapter, run=adapter.parent, merged=merged,
                           samples=samples, problems=problems)


@pytest.mark.slow
def test_batched_generation_equals_batch_size_one(ws):
    assert len(ws.samples) == 8 and not ws.problems
    for model in (str(ws.base), str(ws.adapter)):
        loaded = load_for_inference(model)
        lengths = {len(build_inputs(s["question"], s["images"], loaded.settings, loaded.tokenizer)[0])
                   for s in ws.samples[:4]}
        assert len(lengths) > 1  # the first batch really is padded
        one, _, _ = evaluate(loaded, ws.samples, batch_size=1, max_new_tokens=8)
        four, scores, summary = evaluate(loaded, ws.samples, batch_size=4, max_new_tokens=8)
        assert four == one, model
        assert summary["count"] == 8 and len(scores) == 8


def test_loss_curve_is_found_for_adapter_and_merged_folders(ws, tmp_path):
    rows = [json.loads(x) for x in (ws.run / "metrics.jsonl").read_text().splitlines()]
    expected = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert len(expected) == 16
    assert run_folder_of(ws.adapter) == ws.run and loss_curve_of(ws.adapter) == expected
    assert run_folder_of(ws.merged) == ws.run and loss_curve_of(ws.merged) == expected
    assert loss_curve_of(ws.base) is None
    # a resumed run logs some steps twice: the later value wins
    run2 = tmp_path / "run2"
    (run2 / "adapter").mkdir(parents=True)
    (run2 / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "eval_loss": 9.0},
        {"step": 3, "loss": 1.0})) + "\n{\"step\": 4, \"lo")
    assert loss_curve_of(run2 / "adapter") == [(1, 3.0), (2, 1.5), (3, 1.0)]


def _chromium() -> str | None:
    return shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)


def _run_chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / "profile"
    profile.mkdir(exist_ok=True)
    env = dict(os.environ, HOME=str(tmp), XDG_CONFIG_HOME=str(tmp / "cfg"), XDG_CACHE_HOME=str(tmp / "cache"))
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env)


def test_validate_writes_results_and_report(ws, tmp_path):
    out = tmp_path / "validation"
    summary = validate(str(ws.base), str(ws.merged), str(ws.dir / "data" / "heldout_meta.json"), str(out),
                       batch_size=4, max_new_tokens=8)
    data = json.loads((out / "validation.json").read_text())
    assert data["summary"] == summary and summary["samples"] == 8
    assert set(summary["tuned"]) >= {"exact_match", "anls", "rouge_l", "count"}
    rows = data["samples"]
    assert len(rows) == 8
    for r in rows:
        assert set(r["tuned_score"]) == {"exact_match", "anls", "rouge_l"}
    assert summary["tuned"]["exact_match"] == pytest.approx(np.mean([r["tuned_score"]["exact_match"] for r in rows]))
    doc = (out / "report.html").read_text()
    assert "<polyline" in doc  # the loss curve of the run the merged model came from
    for r in rows:
        assert html.escape(r["question"], quote=False).replace("\n", "<br>") in doc or \
            html.escape(r["question"], quote=False) in doc
    if _chromium() is None:
        pytest.skip("chromium is not installed")
    ws.report, ws.rows = out / "report.html", rows
    proc = _run_chromium(tmp_path, "--dump-dom", ws.report.resolve().as_uri())
    dom = proc.stdout
    assert "<body" in dom, proc.stderr[-2000:]
    for r in rows:
        for key in ("base_answer", "tuned_answer"):
            if r[key]:
                assert html.escape(r[key], quote=False) in dom, (key, r[key])
        assert r["question"].splitlines()[-1] in dom
    assert dom.count('src="data:image/jpeg;base64,') == sum(len(r["images"]) for r in rows)
    assert dom.count('class="badge ok"') + dom.count('class="badge bad"') == 16
    shot = tmp_path / "report.png"
    proc = _run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", ws.report.resolve().as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    im = Image.open(shot).convert("RGB")
    assert im.size == (1200, 2000)
    rgb = np.asarray(im)
    light = (rgb.min(axis=-1) > 240).mean()
    assert 0.4 < light < 0.995, light  # a page of text and images, not blank
    keep = os.environ.get("INTERNVL_LORA_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_preference_pairs_are_ranked_and_shown_with_the_rejected_answer(ws, tmp_path):
    """On preference data validate scores how often each model ranks the chosen answer first (log-probs as
    an independent forward gives them), the tuned model's reward accuracy against the base, and the report
    shows the rejected answer."""
    import torch

    from internvl_lora.data.synthetic import make_preference_dataset
    from internvl_lora.ranking import pair_logps

    data = make_preference_dataset(tmp_path / "pairs", n_train=4, n_heldout=6)
    out = tmp_path / "validation"
    summary = validate(str(ws.base), str(ws.adapter), str(data / "heldout_meta.json"), str(out), batch_size=4,
                       max_new_tokens=4, blank_images=True)
    rows = json.loads((out / "validation.json").read_text())["samples"]
    assert len(rows) == 6 and all("rejected" in r for r in rows)
    for model, key in (("base", "base"), ("tuned", "tuned"), ("blank", "tuned, images blanked")):
        logps = [r[f"{model}_logps"] for r in rows]
        assert summary[key]["ranking_accuracy"] == pytest.approx(np.mean([c > r for c, r in logps]))
        assert summary[key]["mean_margin"] == pytest.approx(np.mean([c - r for c, r in logps]))
    wins = [(t[0] - b[0]) > (t[1] - b[1]) for t, b in zip((r["tuned_logps"] for r in rows), (r["base_logps"] for r in rows))]
    assert summary["tuned"]["reward_accuracy"] == pytest.approx(np.mean(wins))
    # the ranking's log-probabilities equal a full forward of the model on the training encoding
    loaded = load_for_inference(ws.base)
    lines = read_lines(load_meta(str(data / "heldout_meta.json")))
    first = pair_logps(loaded, lines[:1])[0]
    from internvl_lora.data.preference import encode_preference, parse_preference

    enc = encode_preference(parse_preference(lines[0]), loaded.tokenizer, loaded.settings)
    for ids, labels, value in ((enc.chosen_ids, enc.chosen_labels, first[0]), (enc.rejected_ids, enc.rejected_labels, first[1])):
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([ids]), pixel_values=enc.pixel_values).logits[0].float()
        lp = torch.log_softmax(logits[:-1], -1)
        target = torch.tensor(labels[1:])
        keep = target != -100
        assert float(lp[keep].gather(-1, target[keep, None]).sum()) == pytest.approx(value, rel=1e-5)
    assert rows[0]["base_logps"] == pytest.approx(list(first), rel=1e-5)
    doc = (out / "report.html").read_text()
    assert doc.count("<th>Rejected</th>") == 6 and "Chosen ranked first" in doc
    assert html.escape(rows[0]["rejected"]) in doc
