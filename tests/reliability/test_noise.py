"""The normal output of train / merge / chat / validate / convert on the tiny demo holds no library noise:
no FutureWarning and no transformers "You are using a model of type ..." line (issue #17). Python's
warnings are NOT ignored here (the `cli` fixture ignores them), so any warning a command triggers shows."""

from __future__ import annotations

import os
import subprocess

from .conftest import cli_path

NOISE = ("FutureWarning", "DeprecationWarning", "model of type")


def _run(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.run([cli_path(), *map(str, args)], capture_output=True, text=True, timeout=600, env=env)


def test_demo_sized_commands_print_no_library_warnings(demo_folder, tmp_path):
    d = demo_folder(16, 4, copy_to=tmp_path / "demo")
    image = sorted((d / "data" / "images").iterdir())[0]
    adapter, merged, original = d / "run" / "adapter", d / "merged", d / "original"
    outputs = {
        "data check": _run("data", "check", d / "data" / "meta.json", "--model", d / "model"),
        "train": _run("train", d / "train.yaml", "train.max_steps=2", "train.report_to=[]",
                      "data.max_dynamic_patch=2"),
        "merge": _run("merge", adapter, merged),
        "chat adapter": _run("chat", adapter, "--image", image, "colour?", "--max-new-tokens", "2"),
        "validate": _run("validate", "--base", d / "model", "--tuned", adapter, "--data",
                         d / "data" / "heldout_meta.json", "--out", tmp_path / "val", "--limit", "2",
                         "--max-new-tokens", "2", "--blank-images"),
        "convert": _run("convert", merged, original, "--to", "original", "--without-code"),
        "chat original": _run("chat", original, "--image", image, "colour?", "--max-new-tokens", "2"),
    }
    noisy = {cmd: [ln for ln in (p.stdout + p.stderr).splitlines() if any(n in ln for n in NOISE)]
             for cmd, p in outputs.items()}
    assert not {cmd: lines for cmd, lines in noisy.items() if lines}
    assert not {cmd: p.stderr[-2000:] for cmd, p in outputs.items() if p.returncode != 0}
