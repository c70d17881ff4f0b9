"""bench/trace_gaps.py on a hand-made Chrome trace: GPU busy / idle, and --kernel naming the CPU operator that
launched a kernel on a thread without Python frames (the autograd engine's backward)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _trace(path: Path) -> None:
    ev = [
        # main thread: a Python frame of our code around a forward op, which launches kernel 1
        {"cat": "python_function", "name": "src/internvl_lora/lora/fused.py(60): _lora_forward", "tid": 0, "ts": 0, "dur": 100},
        {"cat": "cpu_op", "name": "aten::mm", "tid": 1, "ts": 10, "dur": 20},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 1, "ts": 15, "dur": 2, "args": {"correlation": 1}},
        # autograd thread (no Python frames): a copy to the host inside aten::copy_ under aten::to
        {"cat": "cpu_op", "name": "aten::to", "tid": 7, "ts": 200, "dur": 50},
        {"cat": "cpu_op", "name": "aten::copy_", "tid": 7, "ts": 205, "dur": 40},
        {"cat": "cuda_runtime", "name": "cudaMemcpyAsync", "tid": 7, "ts": 210, "dur": 5, "args": {"correlation": 2}},
        {"cat": "kernel", "name": "gemm_kernel", "ts": 20, "dur": 100, "args": {"correlation": 1}},
        {"cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)", "ts": 220, "dur": 10, "args": {"correlation": 2}},
        {"cat": "kernel", "name": "elementwise_kernel", "ts": 300, "dur": 20, "args": {"correlation": 3}},
    ]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": ev}, f)


def test_busy_share_and_the_operator_behind_a_copy(tmp_path):
    trace = tmp_path / "trace.json.gz"
    _trace(trace)
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "trace_gaps.py"), str(trace), "--kernel", "Memcpy"],
                         capture_output=True, text=True, check=True).stdout
    # window 20..320 us, busy 100 + 10 + 20 = 130 us, two gaps (120 -> 220, 230 -> 300)
    assert "window 0.3 ms, GPU busy 0.1 ms (43 %), idle 0.2 ms in 2 gaps" in out
    line = next(x for x in out.splitlines() if x.startswith("[Memcpy]"))
    assert "x1" in line and "[ops: aten::to > aten::copy_]" in line
