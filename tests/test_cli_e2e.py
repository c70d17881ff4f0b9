"""The six workflow steps through the `internvl-lora` command, as a user runs them, on a few samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


CLI = [sys.executable, "-m", "internvl_lora.cli"]


def run(*args, check=True):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def workdir(demo_folder, tmp_path_factory):
    return demo_folder(24, 8, copy_to=tmp_path_factory.mktemp("e2e"))


@pytest.mark.slow
def test_workflow_end_to_end(workdir):
    d = workdir
    check = run("data", "check", d / "data/meta.json", "--model", d / "model")
    assert "samples: 24  valid: 24" in check.stdout

    run("train", d / "train.yaml", "train.max_steps=6", "train.logging_steps=2", "train.save_steps=3",
        "train.report_to=[]", f"train.output_dir={d / 'run'}")
    adapter = d / "run/adapter"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    meta = json.loads((adapter / "internvl_lora.json").read_text())
    assert meta["global_step"] == 6 and meta["template"] == "internvl2_5"
    # Adapter-only checkpoints: no full model weights in the step folders.
    ckpts = sorted((d / "run").glob("checkpoint-*"))
    assert ckpts and all(not (c / "model.safetensors").exists() for c in ckpts)
    assert all((c / "adapter_model.safetensors").exists() for c in ckpts)
    assert (d / "run/config.yaml").exists() and (d / "run/metrics.jsonl").exists()

    merged = d / "merged"
    report = json.loads(run("merge", adapter, merged).stdout)
    assert report["ok"] and report["max_abs_diff_adapter_vs_merged"] <= report["tolerance"]
    assert report["max_abs_diff_merged_vs_base"] > 0
    assert (merged / "model.safetensors").exists() and (merged / "tokenizer.json").exists()
    assert (merged / "merge_report.json").exists()

    image = next((d / "data/images").glob("1000*_a.png"))
    answer = run("chat", merged, "--image", image, "--max-new-tokens", "4", "What color is the shape?")
    # Only the answer goes to stdout (a barely trained model may answer with an empty line).
    assert len(answer.stdout.splitlines()) == 1

    out = d / "validation"
    run("validate", "--base", d / "model", "--tuned", merged, "--data", d / "data/heldout_meta.json",
        "--out", out, "--max-new-tokens", "4")
    result = json.loads((out / "validation.json").read_text())
    assert result["summary"]["samples"] == 8 and len(result["samples"]) == 8
    assert (out / "report.html").read_text().count("<img") >= 8


def test_bad_config_is_one_paragraph(workdir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: /nope\ntrain:\n  lerning_rate: 1\n")
    p = run("train", bad, check=False)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert "unknown key train.lerning_rate" in p.stderr
    assert "model.path /nope does not exist" in p.stderr and "data.meta is required" in p.stderr


@pytest.mark.slow
def test_bad_dataset_refuses_training(workdir, tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"conversations": [{"from": "human", "value": "hi"}]}\n{not json\n')
    check = run("data", "check", jsonl, "--model", workdir / "model", check=False)
    assert check.returncode == 1
    assert f"{jsonl}:1: [missing_answer]" in check.stdout and f"{jsonl}:2: [bad_json]" in check.stdout
    p = run("train", workdir / "train.yaml", f"data.meta={jsonl}", "train.report_to=[]",
            f"train.output_dir={tmp_path / 'run'}", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "found 2 bad sample(s)" in p.stderr
