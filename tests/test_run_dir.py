"""The run folder (`internvl_lora.run_dir`): checkpoint listing, the final adapter, configs of earlier runs."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from internvl_lora.config import load_config
from internvl_lora.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures one_thread, demo: tests/conftest.py


def config(demo, out, *extra):
    return load_config(demo, [f"train.output_dir={out}", "train.logging_steps=1", "train.per_device_batch_size=4",
                              "train.warmup_ratio=0", *extra])


def test_write_error_on_the_final_adapter_is_clear(demo, tmp_path, monkeypatch):
    import internvl_lora.train as train_mod
    from internvl_lora.errors import CheckpointSaveError

    real = train_mod.InternVLTrainer.save_model

    def failing(self, output_dir=None, _internal_call=False):
        if ".adapter.partial" in str(output_dir):
            real(self, output_dir, _internal_call)
            raise PermissionError(errno.EACCES, "Permission denied", str(output_dir))
        return real(self, output_dir, _internal_call)

    monkeypatch.setattr(train_mod.InternVLTrainer, "save_model", failing)
    out = tmp_path / "run"
    with pytest.raises(CheckpointSaveError) as e:
        train_mod.train(config(demo, out, "train.report_to=[]", "train.max_steps=2", "train.save_steps=2"))
    assert "could not write the final adapter" in str(e.value) and "Permission denied" in str(e.value)
    assert "checkpoint-2 is intact" in str(e.value)
    assert not (out / "adapter").exists() and not (out / ".adapter.partial").exists()


def test_incomplete_checkpoints_are_skipped_on_resume(tmp_path, capsys):
    from internvl_lora.run_dir import find_resume_checkpoint, is_complete_checkpoint, last_complete_checkpoint

    def ckpt(step, state=True, weights=True):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if weights:
            (d / "adapter_model.safetensors").write_bytes(b"x")
        if state:
            (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        return d

    ckpt(2)
    ckpt(4)
    cut = ckpt(6, state=False)  # killed before trainer_state.json
    torn = ckpt(8)
    (torn / "trainer_state.json").write_text('{"global_st')  # killed while writing it
    (tmp_path / "checkpoint-x").mkdir()
    assert not is_complete_checkpoint(cut) and not is_complete_checkpoint(torn)
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-4"
    assert find_resume_checkpoint(tmp_path).name == "checkpoint-4"
    assert "checkpoint-6 is incomplete" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-x"]
    assert find_resume_checkpoint(tmp_path / "missing") is None


LEGACY = {"fused_lora": True, "lora_kernels": True, "fused_mlp": True, "chunked_loss": True, "compile": False}


def _legacy_run_folder(demo, out: Path, **legacy) -> Path:
    """A run folder as an earlier version left it: its config.yaml has the four fused switches and compile."""
    import yaml

    from internvl_lora.config import save_config

    out.mkdir(parents=True, exist_ok=True)
    save_config(config(demo, out, "train.report_to=[]"), out / "config.yaml")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["train"]["fused"]
    saved["train"].update({**LEGACY, **legacy})
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    return out / "config.yaml"


def test_config_of_an_earlier_run_loads_and_resumes(demo, tmp_path, capsys):
    """A pre-`train.fused` run folder: its config.yaml loads (defaults: train.fused=true, silently), and a
    checkpoint it holds resumes with that config and with today's."""
    from internvl_lora.run_dir import check_resume_compatible
    from internvl_lora.train import train

    out = tmp_path / "run"
    train(config(demo, out, "train.report_to=[]", "train.max_steps=2", "train.save_steps=2", "data.num_workers=0"))
    assert (out / "checkpoint-2" / "trainer_state.json").exists()
    legacy_yaml = _legacy_run_folder(demo, out)
    capsys.readouterr()
    old = load_config(legacy_yaml, ["train.resume=true", "train.max_steps=3"])
    assert old.train.fused is True and "legacy" not in capsys.readouterr().out
    check_resume_compatible(out, old)
    check_resume_compatible(out, config(demo, out))
    train(old)
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and "resuming from" in capsys.readouterr().out


@pytest.mark.parametrize("key", ["fused_lora", "lora_kernels", "fused_mlp", "chunked_loss"])
def test_a_legacy_fused_switch_set_false_means_train_fused_false(demo, tmp_path, capsys, key):
    capsys.readouterr()
    cfg = load_config(_legacy_run_folder(demo, tmp_path / "run", **{key: False}))
    assert cfg.train.fused is False
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "legacy" in ln]
    assert len(lines) == 1 and f"train.{key}=false" in lines[0] and "train.fused=false" in lines[0]
    assert "fused_lora" not in cfg.to_dict()["train"]


def test_legacy_compile_true_is_a_clear_error(demo, tmp_path):
    with pytest.raises(UserError) as e:
        load_config(_legacy_run_folder(demo, tmp_path / "run", compile=True))
    assert "train.compile was removed" in str(e.value) and "config.yaml" in str(e.value)


def test_an_adapter_saved_without_weights_stops_the_run(tmp_path):
    """What PEFT wrote under FSDP's activation-checkpoint wrapper: a valid file with no tensor. The run
    stops there instead of handing over an adapter that changes nothing."""
    import pytest
    import torch
    from safetensors.torch import save_file

    from internvl_lora.run_dir import _check_adapter_holds_weights

    save_file({}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(RuntimeError, match="holds no weights"):
        _check_adapter_holds_weights(tmp_path)
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / "adapter_model.safetensors"))
    _check_adapter_holds_weights(tmp_path)  # weights: fine
