"""bench/smi_phases.py on hand-made nvidia-smi samples and marks: samples fall into the phase between two
marks, idle samples (load, start) are left out, throttle reasons are counted as shares."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path) -> tuple[Path, Path]:
    smi = tmp_path / "smi.csv"
    rows = [
        ("10:00:00.100", 345, 71.0, "0x0000000000000001"),   # before the first mark: in no phase
        ("10:00:01.100", 1365, 699.0, "0x0000000000000004"),  # matmuls
        ("10:00:01.350", 1395, 701.0, "0x0000000000000004"),
        ("10:00:01.600", 1320, 698.0, "0x0000000000000000"),
        ("10:00:02.100", 1980, 95.0, "0x0000000000000000"),   # the step's process loading: idle, left out
        ("10:00:02.350", 1800, 680.0, "0x0000000000000004"),  # the step
        ("10:00:02.600", 1770, 690.0, "0x0000000000000004"),
        ("10:00:03.100", 1980, 600.0, "0x0000000000000000"),  # after the last mark: in no phase
    ]
    smi.write_text("".join(f"2026/12/07 {t}, {mhz} MHz, 2619 MHz, {w:.2f} W, 60, {r}\n" for t, mhz, w, r in rows)
                   + "2026/12/07 10:00:03.200, [N/A], [N/A], [N/A], [N/A], [N/A]\n")
    marks = tmp_path / "bench.jsonl"
    marks.write_text('"sustained at 1 10:00:01.000000000"\n{"card": "x", "matmul_bf16_tflops": 700}\n'
                     '"main at 2 10:00:02.000000000"\n{"size": "8b"}\n"end at 3 10:00:03.000000000"\n')
    return smi, marks


def test_phases_split_by_marks_and_skip_idle_samples(tmp_path):
    smi, marks = _write(tmp_path)
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "smi_phases.py"), str(smi), str(marks)],
                         capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["phase"] for r in rows] == ["sustained", "main"]
    sustained, main = rows
    assert sustained["loaded_samples"] == 3 and sustained["sm_mhz_median"] == 1365
    assert sustained["watts_max"] == 701.0
    assert sustained["reasons"] == {"0x0000000000000000": 0.33, "0x0000000000000004": 0.67}
    assert main["loaded_samples"] == 2 and main["sm_mhz_median"] == 1785
    assert main["reasons"] == {"0x0000000000000004": 1.0}
