"""Training end to end on the tiny InternVL: the output folder, evaluation during training (held-out
split, eval loss, generation metric), adapter-only checkpoints, and write errors while saving."""

from __future__ import annotations

import errno
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from internvl_lora.run_dir import read_metrics
from internvl_lora.config import load_config
from internvl_lora.errors import UserError


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures one_thread, demo: tests/conftest.py


def config(demo, out, *extra):
    return load_config(demo, [f"train.output_dir={out}", "train.logging_steps=1", "train.per_device_batch_size=4",
                              "train.warmup_ratio=0", *extra])


@pytest.fixture(scope="module")
def full_run(demo, tmp_path_factory):
    """One run with every output: held-out split, eval loss, generation metric, checkpoints, tensorboard."""
    from internvl_lora.train import train

    out = tmp_path_factory.mktemp("full") / "run"
    cfg = config(demo, out, "train.max_steps=6", "train.save_steps=2", "train.save_total_limit=2",
                 "data.eval_fraction=0.25", "train.eval_steps=3", "train.generate_steps=3",
                 "train.generate_samples=3", "train.generate_max_new_tokens=4")
    adapter = train(cfg)
    return cfg, out, adapter


def test_output_folder_layout(full_run, demo):
    cfg, out, adapter = full_run
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "internvl_lora.json", "trainable_params.json", "metrics.jsonl", "loss_curve.png",
            "tensorboard", "adapter"} <= names
    # the resolved config is saved and loads back
    saved = load_config(out / "config.yaml")
    assert saved.to_dict() == cfg.to_dict()
    meta = json.loads((out / "internvl_lora.json").read_text())
    train_jsonl = demo.parent / "data" / "train.jsonl"
    assert meta["dataset_fingerprint"] == hashlib.sha256(train_jsonl.read_bytes()).hexdigest()[:16]
    assert meta["data"]["eval_samples"] == 4 and meta["data"]["train_samples"] == 12
    for lib in ("torch", "transformers", "peft", "accelerate", "python"):
        assert meta["versions"][lib]
    assert meta["versions"]["transformers"] == __import__("transformers").__version__
    assert meta["policy"]["llm"] == "lora" and meta["trainable"]["trainable"] > 0
    assert list((out / "tensorboard").glob("**/events.out.tfevents.*"))


def test_checkpoints_hold_the_adapter_and_resume_state_only(full_run):
    _, out, _ = full_run
    ckpts = sorted(p.name for p in out.glob("checkpoint-*"))
    assert ckpts == ["checkpoint-4", "checkpoint-6"]  # save_total_limit 2 of 2, 4, 6
    for c in ckpts:
        files = {p.name for p in (out / c).iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                "trainer_state.json"} <= files
        assert not any(f.startswith(("model", "pytorch_model")) for f in files), files
        state = json.loads((out / c / "trainer_state.json").read_text())
        assert state["global_step"] == int(c.split("-")[1])  # the data position
    size = (out / "checkpoint-6" / "adapter_model.safetensors").stat().st_size
    assert size < 2_000_000  # LoRA r16 on the tiny LLM, not the model


def test_final_adapter_describes_itself(full_run):
    cfg, out, adapter = full_run
    files = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "internvl_lora.json", "config.yaml",
            "tokenizer.json", "preprocessor_config.json", "generation_config.json"} <= files
    meta = json.loads((adapter / "internvl_lora.json").read_text())
    assert meta["global_step"] == 6 and meta["final_loss"] > 0 and meta["final_eval_loss"] > 0
    assert meta["final_generation_eval"]["step"] == 6
    assert meta["base_model"] == str(Path(cfg.model.path).resolve())
    assert not (out / ".adapter.partial").exists()


def test_eval_loss_and_generation_metric_during_training(full_run):
    _, out, _ = full_run
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]  # every eval_steps, no duplicate at the end
    gen = [r for r in rows if "eval_gen_exact_match" in r]
    assert [r["step"] for r in gen] == [3, 6]
    for r in gen:
        assert r["eval_gen_samples"] == 3
        for m in ("exact_match", "anls", "rouge_l"):
            assert 0.0 <= r[f"eval_gen_{m}"] <= 1.0
    first, last = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert last < first  # it learns something in 6 steps at lr 3e-3


def test_loss_curve_png_is_written(full_run):
    from PIL import Image

    _, out, _ = full_run
    with Image.open(out / "loss_curve.png") as img:
        assert img.format == "PNG" and img.size[0] > 100
    assert not list(out.glob("*.tmp.png"))


def test_eval_fraction_split_is_deterministic_and_disjoint(demo):
    from internvl_lora.data.meta import Line
    from internvl_lora.train import split_heldout

    class FakeDataset:
        def __init__(self):
            # 10 distinct lines, line 3 repeated twice (repeat_time)
            self.lines = [Line.__new__(Line) for _ in range(11)]
            for k, ln in enumerate(self.lines):
                object.__setattr__(ln, "index", k if k < 10 else 3)
            self.lengths = list(range(11))
            self.train = True

    a_train, a_eval = split_heldout(FakeDataset(), 0.3, seed=1)
    b_train, b_eval = split_heldout(FakeDataset(), 0.3, seed=1)
    c_train, c_eval = split_heldout(FakeDataset(), 0.3, seed=2)
    held = {ln.index for ln in a_eval.lines}
    assert len(held) == 3 and len(a_eval.lines) == 3  # a repeated line is evaluated once
    assert held == {ln.index for ln in b_eval.lines}
    assert held != {ln.index for ln in c_eval.lines}
    assert not held & {ln.index for ln in a_train.lines}
    assert len(a_train.lines) + sum(1 for ln in FakeDataset().lines if ln.index in held) == 11
    assert a_train.train and not a_eval.train
    assert a_train.lengths == [k for k in range(11) if FakeDataset().lines[k].index not in held]
    with pytest.raises(UserError, match="leaves no training sample"):
        split_heldout(FakeDataset(), 0.99, seed=1)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(demo, tmp_path, monkeypatch, capsys):
    from internvl_lora import cli
    from internvl_lora.run_dir import is_complete_checkpoint

    out = tmp_path / "run"
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        if str(f).endswith("optimizer.pt") and "checkpoint-2" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    args = ["internvl-lora", "train", str(demo), f"train.output_dir={out}", "train.report_to=[]",
            "train.max_steps=3", "train.save_steps=1", "train.save_total_limit=1", "train.per_device_batch_size=4"]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: could not write checkpoint" in err and "checkpoint-2 at step 2: No space left on device" in err
    assert "checkpoint-1 is intact" in err and "train.resume=true" in err
    assert "Traceback" not in err
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    assert is_complete_checkpoint(out / "checkpoint-1")
    assert not (out / "adapter").exists()
    # space freed: the same command with train.resume=true finishes from checkpoint-1
    monkeypatch.setattr(torch, "save", real_save)
    monkeypatch.setattr(sys, "argv", args + ["train.resume=true"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 0
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((out / "adapter" / "internvl_lora.json").read_text())["global_step"] == 3


def test_resume_refuses_another_policy_and_a_second_run_in_the_folder(demo, tmp_path):
    from internvl_lora.train import train

    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"x")
    (out / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3}')
    (out / "config.yaml").write_text(yaml.safe_dump({"policy": {**config(demo, out).to_dict()["policy"], "r": 8}}))
    with pytest.raises(UserError, match=r"different policy \(policy.r: 8 -> 16\)"):
        train(config(demo, out, "train.resume=true"))
    with pytest.raises(UserError, match=r"already holds an earlier run: 1 checkpoint\(s\) \(checkpoint-3\)"):
        train(config(demo, out))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_steps_do_not_wait_for_the_gpu(demo, tmp_path, monkeypatch):
    """Over optimizer steps 2 and 3 of a real run (packed, chunked loss, watchdog on, CUDA), no host-device
    synchronization comes from our code, the Trainer or accelerate -- each would leave the GPU idle while
    the host prepares the next work. (The model's own forward -- transformers' image-token count check and
    packed-sequence detection -- still synchronizes; that is not counted here.)"""
    import traceback
    import warnings

    import internvl_lora.train as tr

    syncs = []

    class Probe(tr.Watchdog):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:
                torch.cuda.set_sync_debug_mode("warn")
                torch.ones(1, device="cuda").sum().item()  # a known sync: the probe must record it
            elif state.global_step == 3:
                torch.cuda.set_sync_debug_mode(0)

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            syncs.append(traceback.extract_stack()[:-1])

    monkeypatch.setattr(tr, "Watchdog", Probe)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            monkeypatch.setattr(warnings, "showwarning", record)
            tr.train(config(demo, tmp_path / "run", "train.max_steps=5", "data.packing=true", "model.dtype=bfloat16",
                            "train.logging_steps=100",
                            "train.save_steps=100"))
    finally:
        torch.cuda.set_sync_debug_mode(0)

    def caller(stack):  # the innermost frame outside torch and warnings
        return next(f for f in reversed(stack) if "/torch/" not in f.filename and "warnings" not in f.filename)

    callers = [caller(s) for s in syncs]
    assert any(f.filename == __file__ for f in callers), callers  # the probe records syncs
    ours = [f"{f.filename}:{f.lineno} {f.line}" for f in callers if f.filename != __file__
            and any(k in f.filename for k in ("internvl_lora", "transformers/trainer", "accelerate/"))]
    assert not ours, ours


def test_packing_is_refused_for_an_llm_it_would_compute_wrongly_before_anything_loads(demo, tmp_path, monkeypatch):
    """An InternVL3.5-GPT-OSS checkpoint with data.packing (the default): the packed attention has no attention
    sinks or sliding windows, so the run stops before the data audit and the weights, and writes nothing."""
    import dataclasses

    import internvl_lora.train as train_module

    real = train_module.inspect_checkpoint
    monkeypatch.setattr(train_module, "inspect_checkpoint",
                        lambda path: dataclasses.replace(real(path), llm_type="gpt_oss"))
    monkeypatch.setattr(train_module, "prepare_data", lambda *a, **k: pytest.fail("the data was read"))
    monkeypatch.setattr(train_module, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"attention sinks and sliding windows .*\(gpt_oss\); set data\.packing=false"):
        train_module.train(config(demo, out, "data.packing=true"))
    assert not out.exists()
