"""bench/e2e_bench.py on CPU at the tiny shape: generated real-format data and checkpoint, the training
command as a subprocess, the step bench on the same samples, the loader alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "fixtures" / "real" / "InternVL2_5-1B-MPO"

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not TOKENIZER.is_dir(), reason="real tokenizer fixture not available")]


@pytest.fixture(scope="module")
def e2e():
    sys.path.insert(0, str(ROOT / "bench"))  # the script imports its neighbours
    import e2e_bench

    yield e2e_bench
    sys.path.remove(str(ROOT / "bench"))


def test_generated_data_and_model_train_end_to_end(e2e, tmp_path, capsys):
    data, model, out = tmp_path / "data", tmp_path / "model", tmp_path / "out"
    e2e.main(["--make-data", str(data), "--samples", "24", "--image-scale", "0.15", "--gen-workers", "1",
              "--make-model", str(model), "--size", "tiny", "--tokenizer", str(TOKENIZER)])
    made = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert sum(made[0]["kinds"].values()) == 24 and set(made[0]["kinds"]) >= {"image", "multi_image", "text"}
    assert made[1]["image_token_id"] == 151667 and made[1]["vocab_size"] >= made[1]["tokenizer_len"]
    lines = (data / "train.jsonl").read_text().splitlines()
    multi = next(json.loads(x) for x in lines if isinstance(json.loads(x).get("image"), list))
    assert multi["conversations"][0]["value"].count("<image>") == len(multi["image"])

    e2e.main(["--run", "--data", str(data), "--model", str(model), "--out", str(out), "--size", "tiny",
              "--budget", "8192", "--steps", "4", "--workers", "0"])
    r = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert r["e2e"]["steps"] == 4 and r["e2e"]["steady_steps"] == 3 and r["e2e"]["tokens_per_s"] > 0
    assert 0 < r["e2e"]["time_to_first_step_s"] < r["e2e"]["process_s"]
    assert r["step_bench"]["real_tokens_per_s"] > 0 and r["e2e_over_step"] > 0
    assert list((out / "run").glob("checkpoint-*"))  # the checkpoint save is part of the run
    assert (out / "train_log.txt").read_text().count("step ") >= 4

    e2e.main(["--loader-only", "--data", str(data), "--model", str(model), "--out", str(tmp_path / "lo"),
              "--budget", "8192", "--worker-counts", "0,1", "--loader-samples", "8"])
    lo = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(lo["per_workers"]) == {"0", "1"} and lo["per_workers"]["1"]["samples_per_s"] > 0
    assert lo["audit_s_per_1000_samples"] > 0
