"""The loss-health watchdog (each diagnosis triggered for real on the tiny model), the log line with
label-mask coverage, the loss-curve PNG and the counters behind them."""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl

from internvl_lora.train.callbacks import (
    LogLine, LossCurve, StepStats, TrainingHealthError, Watchdog, all_reduce, lora_b_max, read_metrics,
)
from internvl_lora.config import load_config
from internvl_lora.errors import UserError
from internvl_lora.plots import plot_loss_curve


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures one_thread, demo: tests/conftest.py


def config(demo, out, *extra):
    return load_config(demo, [f"train.output_dir={out}", "train.report_to=[]", "train.logging_steps=1",
                              "train.per_device_batch_size=4", "train.warmup_ratio=0", "train.save_steps=100",
                              *extra])


def hook_logits(monkeypatch, fn):
    """Register `fn(step, logits) -> logits` as a forward hook on the LM head of the model train() builds."""
    import internvl_lora.train as train_mod

    real = train_mod.apply_policy
    calls = {"n": 0}

    def spy(model, policy, llm_type):
        def hook(module, args, output):
            if module.training:
                calls["n"] += 1
            return fn(calls["n"], output)

        model.lm_head.register_forward_hook(hook)
        return real(model, policy, llm_type)

    monkeypatch.setattr(train_mod, "apply_policy", spy)


def metrics(out):
    return read_metrics(out / "metrics.jsonl")


# ---------------------------------------------------------------------------------------------------
# Each diagnosis, for real


def test_nan_loss_stops_training_at_that_step(demo, tmp_path, monkeypatch):
    from internvl_lora.train import train

    hook_logits(monkeypatch, lambda n, out: out * float("nan") if n >= 3 else out)
    cfg = config(demo, tmp_path / "run", "train.max_steps=6", "train.save_steps=1", "train.save_total_limit=1")
    with pytest.raises(TrainingHealthError) as e:
        train(cfg)
    assert "the loss is nan at optimizer step 3" in str(e.value)
    assert "lower train.lr" in str(e.value)
    assert isinstance(e.value, UserError)  # the CLI prints it without a traceback
    # steps 1 and 2 were saved; the poisoned step 3 is neither saved nor followed by more steps
    names = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert names == ["checkpoint-2"]  # the demo config keeps 1 checkpoint: the last good one survives
    assert not (tmp_path / "run" / "adapter").exists()
    rows = metrics(tmp_path / "run")
    assert rows[-1]["watchdog"].startswith("the loss is nan") and rows[-1]["step"] == 3


def test_batches_without_trained_tokens_are_diagnosed(demo, tmp_path, monkeypatch):
    from internvl_lora.data.dataset import SupervisedDataset
    from internvl_lora.train import train

    real = SupervisedDataset.__getitem__

    def masked(self, i):
        item = real(self, i)
        item["labels"] = torch.full_like(torch.as_tensor(item["labels"]), -100)
        return item

    monkeypatch.setattr(SupervisedDataset, "__getitem__", masked)
    with pytest.raises(TrainingHealthError) as e:
        train(config(demo, tmp_path / "run", "train.max_steps=4"))
    assert "micro-batch(es) of optimizer step 1 had no trained token" in str(e.value)
    assert "internvl-lora data inspect" in str(e.value)


def test_dead_lora_is_diagnosed_through_the_cli(demo, tmp_path, monkeypatch, capsys):
    import internvl_lora.config as config_mod
    from internvl_lora import cli

    real = config_mod.load_config

    def lr_zero(*args, **kw):  # the config check refuses lr 0, so set it after loading
        cfg = real(*args, **kw)
        cfg.train.lr = 0.0
        return cfg

    monkeypatch.setattr(config_mod, "load_config", lr_zero)
    monkeypatch.setattr(sys, "argv", ["internvl-lora", "train", str(demo), f"train.output_dir={tmp_path / 'run'}",
                                      "train.report_to=[]", "train.max_steps=4", "train.watchdog_lora_steps=2"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: training stopped by the loss-health watchdog: every LoRA B matrix is still exactly zero after 2" \
        in err
    assert "Traceback" not in err


def test_exploding_gradients_are_diagnosed(demo, tmp_path, monkeypatch):
    from internvl_lora.train import train

    hook_logits(monkeypatch, lambda n, out: out * 1e6)  # gradients ~1e6 larger than normal
    with pytest.raises(TrainingHealthError) as e:
        train(config(demo, tmp_path / "run", "train.max_steps=8", "train.epochs=4"))
    assert "the gradient norm exploded" in str(e.value) and "for 3 log intervals in a row" in str(e.value)
    rows = [r for r in metrics(tmp_path / "run") if "grad_norm" in r]
    assert len(rows) == 3 and all(r["grad_norm"] > 1e4 for r in rows)


def test_healthy_run_is_not_stopped_and_logs_label_coverage(demo, tmp_path, capsys):
    from internvl_lora.train import train

    train(config(demo, tmp_path / "run", "train.max_steps=3"))
    rows = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0 < r["label_coverage"] < 0.2 for r in rows)  # short answers: a few % of the tokens train
    assert all(r["tokens_per_s"] > 0 and r["trained_tokens"] > 0 for r in rows)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("step 1/3"))
    for piece in ("loss ", "lr ", "gnorm ", "% of tokens", "tok/s", "tiles/s", "eta "):
        assert piece in line, (piece, line)


def test_time_waiting_for_the_loader_and_writing_checkpoints_is_logged(demo, tmp_path, monkeypatch, capsys):
    import time

    from internvl_lora.data.dataset import SupervisedDataset
    from internvl_lora.train import train

    real = SupervisedDataset.__getitem__

    def slow(self, i):  # a loader that cannot keep up: 50 ms per sample, 4 samples per step
        time.sleep(0.05)
        return real(self, i)

    monkeypatch.setattr(SupervisedDataset, "__getitem__", slow)
    train(config(demo, tmp_path / "run", "train.max_steps=4", "train.save_steps=2", "data.num_workers=0"))
    rows = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # 16 samples x 50 ms waited for in all; accelerate's loader fetches one batch ahead, so a step's wait is
    # mostly the next batch's and the last step waits for nothing
    assert sum(r["data_wait_s"] for r in rows) >= 0.75
    assert all(r["data_wait_s"] >= 0.2 and 0 < r["data_wait_share"] <= 1 for r in rows[:3]), rows
    # the save at step 2 is logged with the next record (the Trainer logs a step before it saves it)
    assert [("checkpoint_s" in r) for r in rows] == [False, False, True, False]
    assert 0 < rows[2]["checkpoint_s"] < 60
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("step 3/4"))
    assert "data wait " in line and line.rstrip().endswith("%")


# ---------------------------------------------------------------------------------------------------
# Units


def _state(step=1, max_steps=10):
    return SimpleNamespace(global_step=step, max_steps=max_steps, is_world_process_zero=True, epoch=0.1)


def test_watchdog_on_log_rules():
    w = Watchdog(StepStats(), patience=2, max_grad_norm_alarm=100)
    c = TrainerControl()
    w.on_log(None, _state(), c, logs={"loss": 1.0, "grad_norm": 500.0})
    assert w.diagnosis is None and w.high == 1
    w.on_log(None, _state(2), c, logs={"loss": 1.0, "grad_norm": 5.0})  # back to normal resets the count
    assert w.high == 0 and not c.should_training_stop
    c.should_save = True
    w.on_log(None, _state(3), c, logs={"loss": 0.0})
    assert "exactly 0 at step 3" in w.diagnosis
    assert c.should_training_stop and not c.should_save and not c.should_evaluate
    w2 = Watchdog(StepStats())
    w2.on_log(None, _state(), TrainerControl(), logs={"grad_norm": float("inf")})
    assert "gradient norm is inf" in w2.diagnosis
    w3 = Watchdog(StepStats())
    w3.on_log(None, _state(), TrainerControl(), logs={"loss": float("nan")})
    assert "the loss is nan" in w3.diagnosis


def test_lora_b_check_skips_empty_zero3_shards():
    class Shard(torch.nn.Module):
        def __init__(self, local):
            super().__init__()
            self.lora_B = torch.nn.Parameter(torch.empty(0))  # ZeRO-3 placeholder
            self.lora_B.ds_tensor = local

    assert lora_b_max(Shard(torch.zeros(0))) == 0.0
    assert lora_b_max(Shard(torch.tensor([0.0, -0.5]))) == 0.5
    assert lora_b_max(torch.nn.Linear(2, 2)) is None
    w = Watchdog(StepStats(), Shard(torch.zeros(3)), lora_check_step=2)
    c = TrainerControl()
    w.on_train_begin(None, _state(0), c)
    w.on_step_end(None, _state(1), c)
    assert w.diagnosis is None
    w.on_step_end(None, _state(2), c)
    assert "every LoRA B matrix is still exactly zero" in w.diagnosis
    # a non-zero B at the start (PiSSA / OLoRA init) is not a dead adapter
    w = Watchdog(StepStats(), Shard(torch.ones(3)), lora_check_step=1)
    w.on_train_begin(None, _state(0), TrainerControl())
    w.on_step_end(None, _state(5), TrainerControl())
    assert w.diagnosis is None


def test_step_stats_count_shifted_labels_tiles_and_empty_batches():
    s = StepStats()
    s.add({"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2]),
           "labels": torch.tensor([[5, -100, -100, 7, 8], [-100, -100, 9, -100, -100]]),
           "pixel_values": torch.zeros(3, 3, 8, 8)})
    assert (s.tokens, s.trained, s.tiles, s.empty_batches) == (8, 3, 3, 0)  # label at position 0 never trains
    s.add({"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.tensor([[1, -100, -100, -100]])})
    assert s.empty_batches == 1 and s.step_empty == 1 and s.tiles == 3
    s.sync()
    assert (s.global_tokens, s.global_trained, s.global_tiles) == (12, 3, 3)
    assert all_reduce([1.0, 2.0], "max") == [1.0, 2.0]


def test_log_line_writes_metrics_and_truncates_on_resume(tmp_path):
    printed = []
    s = StepStats()
    log = LogLine(s, tmp_path, print_fn=printed.append)
    log.on_train_begin(None, _state(0), None)
    for step in (1, 2, 3):
        s.tokens += 100
        s.trained += 5
        s.sync()
        log.on_log(None, _state(step), None, logs={"loss": 2.0 / step, "learning_rate": 1e-4, "grad_norm": 1.5})
    log.on_log(None, _state(3), None, logs={"eval_loss": 1.25, "eval_runtime": 0.1})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 3]
    assert rows[0]["label_coverage"] == 0.05 and rows[0]["trained_tokens"] == 5
    assert "eval_loss 1.2500" in printed[-1] and "eval_runtime" not in printed[-1]
    assert "trained 5.0% of tokens" in printed[0]
    assert all(r["data_wait_s"] == 0 and "checkpoint_s" not in r for r in rows[:3])
    assert not any("data wait" in p for p in printed)
    # a resumed run keeps the records up to the checkpoint and logs the rest again
    resumed = LogLine(StepStats(), tmp_path, print_fn=printed.append, resume_step=2)
    assert [r["step"] for r in resumed.history] == [1, 2]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    # a fresh run starts a fresh file
    LogLine(StepStats(), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_loss_curve_png(tmp_path):
    from PIL import Image

    history = [{"step": k, "loss": 3.0 / k} for k in range(1, 20)] + [{"step": 10, "eval_loss": 0.7}]
    path = plot_loss_curve(history, tmp_path / "loss_curve.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (600, 350)
        assert len(set(img.convert("RGB").getdata())) > 10  # something was drawn
    assert plot_loss_curve([{"step": 1, "eval_gen_anls": 0.5}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    # the callback writes it at every save (rank 0 only) and at the end
    (tmp_path / "run").mkdir()
    log = LogLine(StepStats(), tmp_path / "run")
    curve = LossCurve(log, tmp_path / "run")
    curve.on_save(None, _state(), None)  # nothing logged yet: nothing to draw
    curve.wait()
    assert not (tmp_path / "run" / "loss_curve.png").exists()
    for r in history[:5]:
        log.write(r)
    other_rank = SimpleNamespace(**{**vars(_state()), "is_world_process_zero": False})
    curve.on_save(None, other_rank, None)
    assert not (tmp_path / "run" / "loss_curve.png").exists()
    curve.on_save(None, _state(), None)
    curve.wait()
    first = (tmp_path / "run" / "loss_curve.png").read_bytes()
    for r in history[5:]:
        log.write(r)
    curve.on_train_end(None, _state(), None)
    assert (tmp_path / "run" / "loss_curve.png").read_bytes() != first
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["loss_curve.png", "metrics.jsonl"]  # no temporary file


def test_loss_curve_is_drawn_by_a_child_process_and_its_errors_are_raised(tmp_path, monkeypatch):
    import json
    import sys

    log = LogLine(StepStats(), tmp_path)
    for k in range(1, 5):
        log.write({"step": k, "loss": 1.0 / k})
    png = tmp_path / "loss_curve.png"
    curve = LossCurve(log, tmp_path)
    # a child that is still drawing: a second save starts none
    gate = tmp_path / "gate"
    slow = [sys.executable, "-c", f"import pathlib, sys, time\nwhile not pathlib.Path({str(gate)!r}).exists(): "
            "time.sleep(0.02)\nfrom internvl_lora.plots import main; sys.exit(main(sys.argv[1:]))"]
    monkeypatch.setattr(LossCurve, "command", slow)
    curve.on_save(None, _state(), None)
    first = curve._child[0]
    curve.on_save(None, _state(), None)
    assert curve._child[0] is first and not png.exists()
    gate.touch()
    curve.wait()
    assert png.exists() and first.returncode == 0
    monkeypatch.undo()
    # the real command draws the same picture as drawing here
    png.unlink()
    curve.on_save(None, _state(), None)
    curve.wait()
    plot_loss_curve(log.history, tmp_path / "here.png")
    assert png.read_bytes() == (tmp_path / "here.png").read_bytes()
    # a drawing that fails is raised, with its message
    with open(log.path, "a") as f:
        f.write("{not json\n")
    curve.on_save(None, _state(), None)
    with pytest.raises(RuntimeError, match=r"metrics.jsonl:5: not a JSON record"):
        curve.on_train_end(None, _state(), None)
    assert json.loads(log.path.read_text().splitlines()[0])["step"] == 1


def test_generation_metric_scores_what_the_model_answers(demo, monkeypatch):
    import internvl_lora.infer as infer
    from internvl_lora.train.generation_eval import GenerationEval, generation_samples
    from internvl_lora.data.meta import load_meta, read_lines
    from internvl_lora.data.encode import EncodeSettings
    from internvl_lora.internvl.checkpoint import inspect_checkpoint, load_tokenizer

    heldout = demo.parent / "data" / "heldout_meta.json"
    samples = generation_samples(read_lines(load_meta(heldout)), limit=3)
    assert len(samples) == 3 and all(s["reference"] in ("red", "green", "blue", "yellow") for s in samples)
    model_path = demo.parent / "model"
    settings = EncodeSettings.from_checkpoint(inspect_checkpoint(model_path))
    g = GenerationEval(samples, load_tokenizer(model_path), settings, every=1, batch_size=2)
    answers = iter([s["reference"] for s in samples[:2]] + ["purple"])
    monkeypatch.setattr(infer, "generate", lambda loaded, batch, n: [next(answers) for _ in batch])
    m = g.evaluate(torch.nn.Linear(1, 1), "cpu")
    assert m["eval_gen_samples"] == 3
    assert m["eval_gen_exact_match"] == pytest.approx(2 / 3)
    assert 0 <= m["eval_gen_anls"] <= 1 and not math.isnan(m["eval_gen_rouge_l"])


def test_training_health_error_is_a_user_error():
    assert issubclass(TrainingHealthError, UserError)


def test_lora_b_check_reads_the_device_once(monkeypatch):
    """The maxima of all B matrices are combined on the device and read once (on a GPU every read waits for
    it: the check of a 196-layer model cost 196 waits)."""
    model = torch.nn.Module()
    for k, v in enumerate((0.25, -0.75, 0.5)):
        layer = torch.nn.Module()
        layer.lora_B = torch.nn.Parameter(torch.full((2, 3), v))
        layer.lora_A = torch.nn.Parameter(torch.full((3, 2), 9.0))
        model.add_module(f"layer{k}", layer)
    reads = []
    real = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(1) or real(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(1) or real(t))
    assert lora_b_max(model) == 0.75
    assert len(reads) == 1
