"""bench/train_step_bench.py on CPU at the tiny shape: it drives the training command's own setup
(TrainingArguments, log line, watchdog, speed options) through a few token-budget steps and reports."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "bench"))  # the script imports the shared baseline module next to it
    spec = importlib.util.spec_from_file_location("train_step_bench", ROOT / "bench" / "train_step_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(ROOT / "bench"))


def test_tiny_run_uses_the_training_commands_setup(bench, tmp_path):
    r = bench.run("tiny", "packed", 4, 3, 2, 0.0, False, str(tmp_path), warmup=1, budget=1024)
    assert "error" not in r
    assert r["steps"] > 0 and r["real_tokens_per_s"] > 0
    assert any(o.startswith("fused LoRA layers") for o in r["options"]) and "chunked loss" in r["options"]
    assert not list(tmp_path.glob("checkpoint-*"))  # nothing saved inside the timing
    assert (tmp_path / "metrics.jsonl").exists()  # the command's log line ran
    assert len(r["gc_collections"]) == 3 and r["gc_ms_per_step"] >= 0  # the host's collector pauses, measured


def test_finished_profile_writes_the_kernel_table_and_the_trace(bench, tmp_path):
    """The profiler helper behind --profile and --timeline (a CPU profile here)."""
    import gzip
    import json

    import torch
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU])
    prof.__enter__()
    torch.ones(64, 64) @ torch.ones(64, 64)
    table = bench._finish_profile(prof, tmp_path / "out", "kernels.txt", "timeline", sort_by="self_cpu_time_total",
                                  row_limit=5)
    assert "aten::mm" in table and (tmp_path / "out" / "kernels.txt").read_text() == table
    events = json.load(gzip.open(tmp_path / "out" / "timeline.json.gz"))["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in events)
    assert not (tmp_path / "out" / "timeline.json").exists()
