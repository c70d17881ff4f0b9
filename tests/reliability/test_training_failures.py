"""Training outside the happy path: a resume from a checkpoint with a damaged optimizer / scheduler / RNG
state or trainer_state.json is refused before the model is loaded, naming the file and the checkpoint to
resume from instead; a full disk while torch writes a checkpoint removes the half-written folder; an image
that disappears under a loader worker is one clean message; the throughput of a step with a generation
eval is measured without the eval and printed before it; TensorBoard gets tok/s, tiles/s and coverage."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from internvl_lora.config import load_config
from internvl_lora.errors import UserError
from internvl_lora.run_dir import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; demo: tests/reliability/conftest.py

FAST = ["train.logging_steps=1", "train.per_device_batch_size=4", "train.warmup_ratio=0", "train.report_to=[]"]


def config(demo: Path, out: Path, *extra):
    return load_config(demo / "train.yaml", [f"train.output_dir={out}", *FAST, *extra])


@pytest.fixture(scope="module")
def two_checkpoints(demo, tmp_path_factory):
    """A finished run of 2 steps that kept checkpoint-1 and checkpoint-2."""
    from internvl_lora.train import train

    out = tmp_path_factory.mktemp("two") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        train(config(demo, out, "train.max_steps=2", "train.save_steps=1", "train.save_total_limit=0"))
    shutil.rmtree(out / "adapter")
    return out


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _empty(f: Path) -> None:
    f.write_bytes(b"")


def _pickle_that_runs_a_command(f: Path) -> None:
    torch.save({"state": _RunsACommand(f.parent / "PWNED")}, f)


def _no_global_step(f: Path) -> None:
    f.write_text(json.dumps({"log_history": []}))


DAMAGE = {
    "optimizer.pt-truncated": ("optimizer.pt", _truncate),
    "scheduler.pt-empty": ("scheduler.pt", _empty),
    "rng_state.pth-code": ("rng_state.pth", _pickle_that_runs_a_command),
    "trainer_state.json-no-step": ("trainer_state.json", _no_global_step),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_resume_from_a_damaged_checkpoint_is_refused_naming_the_file(case, two_checkpoints, demo, tmp_path,
                                                                     monkeypatch):
    from internvl_lora import train as train_module

    name, damage = DAMAGE[case]
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    damage(out / "checkpoint-2" / name)

    def no_model(*a, **kw):
        raise AssertionError("the model was loaded before the damaged checkpoint was refused")

    monkeypatch.setattr(train_module, "load_model", no_model)
    with pytest.raises(UserError) as e:
        train_module.train(config(demo, out, "train.max_steps=3", "train.save_steps=1", "train.resume=true"))
    msg = str(e.value)
    assert str(out / "checkpoint-2" / name) in msg
    assert str(out / "checkpoint-1") in msg and "train.resume=true" in msg
    assert f"rm -r {out / 'checkpoint-2'}" in msg
    assert not (out / "checkpoint-2" / "PWNED").exists()  # the pickle was never run
    assert (out / "checkpoint-2").is_dir()  # nothing deleted without the user's say


def test_following_the_advice_resumes_from_the_previous_checkpoint(two_checkpoints, demo, tmp_path):
    from internvl_lora.train import train

    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    _truncate(out / "checkpoint-2" / "optimizer.pt")
    cfg = config(demo, out, "train.max_steps=3", "train.save_steps=1", "train.resume=true")
    with pytest.raises(UserError) as e:
        train(cfg)
    rm = next(line for line in str(e.value).split(": ") if line.startswith("rm -r "))
    subprocess.run(shlex.split(rm.split(";")[0].rstrip(". ")), check=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        adapter = train(cfg)
    assert f"resuming from {out / 'checkpoint-1'}" in printed.getvalue()
    assert json.loads((adapter / "internvl_lora.json").read_text())["global_step"] == 3


TORCH_WRITE_FAILED = ("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                      "data/0: file write failed")


def test_torch_write_failure_while_saving_removes_the_half_written_checkpoint(demo, tmp_path, monkeypatch, capsys):
    from internvl_lora import cli

    out = tmp_path / "run"
    real_save = torch.save

    def disk_fills_up(obj, f, *a, **kw):
        if str(f).endswith("optimizer.pt") and "checkpoint-2" in str(f):
            Path(f).write_bytes(b"PK\x03\x04 half")  # torch's writer leaves a partial file behind
            raise RuntimeError(TORCH_WRITE_FAILED)
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    monkeypatch.setattr(sys, "argv", ["internvl-lora", "train", str(demo / "train.yaml"), f"train.output_dir={out}", *FAST,
                                      "train.max_steps=3", "train.save_steps=1", "train.save_total_limit=0"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "could not write checkpoint" in err and "checkpoint-2" in err and "disk" in err
    assert "half-written folder was removed" in err and "checkpoint-1 is intact" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]


def test_other_runtime_errors_while_saving_keep_their_traceback(demo, tmp_path, monkeypatch):
    from internvl_lora.train import train

    real_save = torch.save

    def bug(obj, f, *a, **kw):
        if str(f).endswith("optimizer.pt"):
            raise RuntimeError("some bug in a library")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", bug)
    with pytest.raises(RuntimeError, match="some bug in a library"):
        train(config(demo, tmp_path / "run", "train.max_steps=1", "train.save_steps=1"))


def test_image_gone_under_a_loader_worker_is_one_clean_message(demo, tmp_path, monkeypatch, capsys):
    from internvl_lora import cli
    from internvl_lora import train as train_module

    data = tmp_path / "demo"
    shutil.copytree(demo, data)
    (data / "train.yaml").write_text((data / "train.yaml").read_text().replace(str(demo), str(data)))
    audited = train_module.prepare_data

    def audit_then_delete_images(*a, **kw):
        result = audited(*a, **kw)
        for f in (data / "data" / "images").rglob("*"):
            if f.is_file():
                f.unlink()
        return result

    monkeypatch.setattr(train_module, "prepare_data", audit_then_delete_images)
    monkeypatch.setattr(sys, "argv", ["internvl-lora", "train", str(data / "train.yaml"), f"train.output_dir={tmp_path / 'run'}",
                                      *FAST, "train.max_steps=2", "data.num_workers=1"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Caught" not in err and "worker process" not in err
    first = next(line for line in err.splitlines() if line.startswith("error:"))
    assert str(data / "data" / "train.jsonl") + ":" in first and "passed the data audit but failed" in first


def test_throughput_of_a_step_with_a_generation_eval(demo, tmp_path, monkeypatch):
    from internvl_lora.train import train
    from internvl_lora.train.generation_eval import GenerationEval

    eval_seconds = 2.5

    def slow_eval(self, model, device):
        time.sleep(eval_seconds)
        return {"eval_gen_exact_match": 0.0, "eval_gen_samples": 1}

    monkeypatch.setattr(GenerationEval, "evaluate", slow_eval)
    out = tmp_path / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train(config(demo, out, "train.max_steps=3", "train.generate_steps=1", "train.generate_samples=1",
                     f"data.eval_meta={demo / 'data' / 'heldout_meta.json'}", "train.eval_steps=0"))
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for before, row in zip(rows, rows[1:]):
        assert row["tokens_per_s"] > 0 and row["tiles_per_s"] > 0
        tokens = (row["trained_tokens"] - before["trained_tokens"]) / row["label_coverage"]
        assert tokens / row["tokens_per_s"] < eval_seconds  # the window holds the step, not the eval
    lines = printed.getvalue().splitlines()
    for step in (1, 2, 3):
        train_line = next(i for i, s in enumerate(lines) if s.startswith(f"step {step}/3 | loss"))
        eval_line = next(i for i, s in enumerate(lines) if s.startswith(f"step {step}/3 | eval_gen_"))
        assert train_line < eval_line
    assert "| 0 tok/s" not in printed.getvalue()


def test_tensorboard_gets_throughput_and_label_coverage(demo, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from internvl_lora.train import train

    out = tmp_path / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        train(config(demo, out, "train.max_steps=2", "train.report_to=[tensorboard]"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("tokens_per_s", "tiles_per_s", "label_coverage"):
        assert f"train/{name}" in tags, sorted(tags)
        assert [e.step for e in events.Scalars(f"train/{name}")] == [1, 2]
    assert all(e.value > 0 for e in events.Scalars("train/tokens_per_s"))
