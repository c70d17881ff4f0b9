"""Kill -9 in the middle of training, resume with `train.resume=true`, and get the very same adapter
as an uninterrupted run (CPU, float32, LoRA dropout on).

Bit-exact is achievable and asserted: checkpoints hold the adapter, the optimizer and scheduler
states, the RNG states (so dropout masks continue identically) and the step (the data position); the
data order depends only on (seed, epoch) (`GroupedSampler`), samples are encoded deterministically
and data.num_workers=0 keeps everything in one process. The runs cross epoch boundaries after the
resume point, so the per-epoch reshuffle is covered too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from internvl_lora.run_dir import read_metrics
from internvl_lora.config import load_config

CLI = [sys.executable, "-m", "internvl_lora.cli", "train"]
STEPS = 12  # 16 samples / (2 per device x grad-accum 2) = 4 steps per epoch, 3 epochs


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures one_thread, demo: tests/conftest.py


def overrides(out):
    return [f"train.output_dir={out}", "train.epochs=3", "train.per_device_batch_size=2", "train.grad_accum=2",
            "train.save_steps=2", "train.save_total_limit=2", "train.logging_steps=1", "train.report_to=[]",
            "data.num_workers=0", "train.lr=1e-3", "policy.dropout=0.05"]


def losses(out):
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_adapter(demo, tmp_path):
    from internvl_lora.train import train

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(load_config(demo, overrides(ref)))  # uninterrupted

    proc = subprocess.Popen([*CLI, str(demo), *overrides(run)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (run / "checkpoint-2" / "trainer_state.json").exists():
            assert proc.poll() is None, "training ended before the first checkpoint"
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "adapter").exists()  # killed mid-run, not after
    done = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert done and max(done) < STEPS
    # a save cut short by the kill: resume must skip it (and remove it)
    partial = run / "checkpoint-10"
    partial.mkdir(exist_ok=True)
    (partial / "adapter_model.safetensors").write_bytes(b"\0" * 16)

    resumed = subprocess.run([*CLI, str(demo), *overrides(run), "train.resume=true"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "checkpoint-10 is incomplete" in resumed.stdout
    assert "resuming from" in resumed.stdout and "checkpoint-10" not in resumed.stdout.split("resuming from")[1][:200]

    a = load_file(ref / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)
    # the loss curve is the uninterrupted one: every step once, same values
    assert losses(run) == losses(ref)
    assert [s for s, _ in losses(run)] == list(range(1, STEPS + 1))
    # save_total_limit honoured, the last checkpoint is the final step
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-12"]
    assert json.loads((run / "checkpoint-12" / "trainer_state.json").read_text())["global_step"] == STEPS
    assert json.loads((run / "adapter" / "internvl_lora.json").read_text())["global_step"] == STEPS
