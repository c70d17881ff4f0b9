"""Import-time weight: the modules of the pure-Python paths (config, the CLI's startup, the data audit)
must not import torch, so that `--help`, config errors and `data check` answer without its seconds of loading."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

TORCH_FREE = [
    "internvl_lora.cli",
    "internvl_lora.config",
    "internvl_lora.config_keys",
    "internvl_lora.overrides",
    "internvl_lora.errors",
    "internvl_lora.data.records",
    "internvl_lora.data.audit",
    "internvl_lora.data.inspect",
    "internvl_lora.data.convert",
    "internvl_lora.data.encode",
    "internvl_lora.data.heldout",
    "internvl_lora.data.frame_indices",
    "internvl_lora.data.video",
    "internvl_lora.data.video_probe",
    "internvl_lora.internvl.tiling",
    "internvl_lora.internvl.templates",
    "internvl_lora.internvl.checkpoint",
]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module):
    # A fresh interpreter: in this one, other tests have imported torch already.
    code = f"import sys, {module}; sys.exit('torch imported' if 'torch' in sys.modules else 0)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{module}: {proc.stderr.strip() or proc.stdout.strip()}"
