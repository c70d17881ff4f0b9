"""The run folder loses nothing: a second `train` into a folder holding a run is refused before anything is
written (unless train.resume or train.overwrite), an output_dir that is a file is a clear error, the saved
config reruns from any working folder, Ctrl-C names the checkpoint and the resume command, and a finished
run prints the next command."""

from __future__ import annotations

import contextlib
import io
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from internvl_lora.config import load_config, save_config
from internvl_lora.errors import UserError
from internvl_lora.run_dir import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; demo, cli: tests/reliability/conftest.py

FAST = ["train.logging_steps=1", "train.per_device_batch_size=4", "train.warmup_ratio=0", "train.report_to=[]"]


def config(demo: Path, out: Path, *extra):
    return load_config(demo / "train.yaml", [f"train.output_dir={out}", *FAST, *extra])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def first_run(demo, tmp_path_factory):
    """A finished run (2 steps, a checkpoint at each) and what it printed."""
    from internvl_lora.train import train

    out = tmp_path_factory.mktemp("first") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        adapter = train(config(demo, out, "train.max_steps=2", "train.save_steps=1"))
    return out, adapter, printed.getvalue()


def test_second_train_is_refused_and_the_first_run_is_untouched(first_run, demo):
    from internvl_lora.train import train

    out, _, _ = first_run
    before = snapshot(out)
    assert {"adapter/adapter_model.safetensors", "checkpoint-2/adapter_model.safetensors", "metrics.jsonl",
            "config.yaml"} <= set(before)
    with pytest.raises(UserError) as e:
        train(config(demo, out, "train.max_steps=2", "train.seed=7"))
    msg = str(e.value)
    kept = ", ".join(p.name for p in sorted(out.glob("checkpoint-*")))
    assert str(out) in msg and "a final adapter" in msg and f"({kept})" in msg and "metrics.jsonl" in msg
    assert "train.resume=true" in msg and "train.overwrite=true" in msg and "another train.output_dir" in msg
    assert snapshot(out) == before  # same files, same bytes: nothing deleted, truncated or written


def test_refusal_happens_before_the_model_or_data_is_touched(first_run, demo, monkeypatch):
    import internvl_lora.train as train_mod

    def must_not_run(*a, **k):
        raise AssertionError("the checkpoint was read before the output_dir check")

    monkeypatch.setattr(train_mod, "inspect_checkpoint", must_not_run)
    with pytest.raises(UserError, match="already holds an earlier run"):
        train_mod.train(config(demo, first_run[0]))


def test_overwrite_starts_over(first_run, demo, tmp_path):
    from internvl_lora.train import train

    out = tmp_path / "run"
    shutil.copytree(first_run[0], out)
    (out / "notes.txt").write_text("mine")  # files that are not the run's stay
    old_adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    train(config(demo, out, "train.max_steps=1", "train.save_steps=1", "train.seed=7", "train.overwrite=true"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1]
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != old_adapter
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_still_works_on_a_folder_saved_with_relative_paths(first_run, demo, tmp_path, monkeypatch):
    """A run folder made before paths were saved absolute: its config.yaml holds relative paths."""
    from internvl_lora.train import train

    out = tmp_path / "run"
    shutil.copytree(first_run[0], out)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    saved["model"]["path"] = "model"
    saved["data"]["meta"] = "data/meta.json"
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    monkeypatch.chdir(demo)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train(config(demo, out, "train.max_steps=3", "train.save_steps=1", "train.resume=true"))
    assert f"resuming from {out / 'checkpoint-2'}" in printed.getvalue()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3]


def test_output_dir_that_is_a_file_is_a_clear_error(cli, demo, tmp_path):
    f = tmp_path / "taken"
    f.write_text("not a folder")
    for target in (f, f / "run"):
        proc = cli("train", demo / "train.yaml", f"train.output_dir={target}", "train.max_steps=1")
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert f"{f} is a file, not a folder" in proc.stderr
    assert f.read_text() == "not a folder"


def test_saved_config_reruns_from_another_folder(demo, tmp_path, monkeypatch):
    monkeypatch.chdir(demo)  # paths given relative to the launch folder, not to the config file
    cfg = load_config(demo / "train.yaml", ["data.meta=data/meta.json", "data.eval_meta=data/meta.json",
                                            "train.output_dir=runs/x"])
    save_config(cfg, tmp_path / "saved.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = load_config(tmp_path / "saved.yaml")
    assert again.data.meta == str(demo / "data" / "meta.json")
    assert again.data.eval_meta == str(demo / "data" / "meta.json")
    assert again.model.path == str(Path(cfg.model.path).resolve())
    assert again.train.output_dir == str(demo / "runs" / "x")


def test_ctrl_c_names_the_checkpoint_and_the_resume_command(demo, tmp_path, monkeypatch, capsys):
    import internvl_lora.train as train_mod

    class CtrlCAtStep3(train_mod.LossCurve):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt

    out = tmp_path / "run"
    argv = ["internvl-lora", "train", str(demo / "train.yaml"), f"train.output_dir={out}", *FAST,
            "train.max_steps=4", "train.save_steps=2"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(train_mod, "LossCurve", CtrlCAtStep3)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(load_config(argv[2], argv[3:]))
    printed = capsys.readouterr().out
    assert f"the last complete checkpoint is {out / 'checkpoint-2'}" in printed
    command = shlex.join(argv + ["train.resume=true"])
    assert f"to continue: {command}" in printed
    # the printed command continues the run
    monkeypatch.undo()
    args = shlex.split(command)
    train_mod.train(load_config(args[2], args[3:]))
    assert f"resuming from {out / 'checkpoint-2'}" in capsys.readouterr().out


def test_train_ends_with_the_next_command(first_run):
    out, adapter, printed = first_run
    lines = printed.strip().splitlines()
    assert lines[-1] == f"next: internvl-lora merge {adapter} MERGED"
    assert f"metrics: {out / 'metrics.jsonl'}, loss curve: {out / 'loss_curve.png'}" in printed
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert all(Path(p).is_absolute() for p in (saved["model"]["path"], saved["data"]["meta"],
                                                saved["train"]["output_dir"]))
