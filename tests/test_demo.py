"""The demo's preference stage (`internvl-lora demo --objective mpo`): on the tiny model, held-out pairs
go from about chance to ranked right, and not with the images blanked. (The supervised demo runs as the
session fixture of tests/conftest.py and in tests/test_cli_e2e.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_preference_demo_learns_from_the_images(tmp_path, one_thread):
    from internvl_lora.demo import run_preference

    r = run_preference(tmp_path / "demo", n_train=240, n_heldout=40)
    assert 0.25 <= r["base_ranking_accuracy"] <= 0.75  # a random model ranks about at chance
    assert r["tuned_reward_accuracy"] >= 0.9 and r["tuned_ranking_accuracy"] >= 0.9
    assert r["blank_image_ranking_accuracy"] <= 0.75  # without the images the preference is gone
    assert json.loads((tmp_path / "demo" / "summary.json").read_text()) == r
    metrics = [json.loads(line) for line in (tmp_path / "demo" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_rewards/accuracy" in m for m in metrics)


def test_demo_objective_is_checked():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-m", "internvl_lora.cli", "demo", "--objective", "dpo"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--objective must be sft or mpo" in p.stderr + p.stdout
