"""bench/loss_head_bench.py on CPU at a tiny shape: one JSON line per count of positions, every timing taken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_prints_a_timing_per_position_count():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "loss_head_bench.py"), "--vocab", "203", "--width", "32",
                          "--positions", "5,17", "--device", "cpu", "--iters", "1"],
                         capture_output=True, text=True, env=env, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["positions"] for r in rows] == [5, 17]
    for r in rows:
        assert all(r[k] > 0 for k in ("loss_ms", "logits_ms", "logits_padded_ms", "grad_ms", "grad_padded_ms",
                                  "logits_split_ms", "grad_split_ms"))
