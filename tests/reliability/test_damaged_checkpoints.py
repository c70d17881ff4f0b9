"""Damaged checkpoints and adapters are named in one clear message (exit code 2), never a traceback, and
found at the folder's boundary, before any heavy work; a base that is not the trained one is noticed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

TRAIN = ["train.max_steps=2", "train.report_to=[]", "train.per_device_batch_size=4", "train.logging_steps=1",
         "train.save_steps=1000"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from internvl_lora.config import load_config
    from internvl_lora.demo import prepare
    from internvl_lora.train import train

    d = tmp_path_factory.mktemp("damaged")
    cfg = prepare(d, n_train=16, n_heldout=4)
    adapter = Path(train(load_config(cfg, TRAIN)))
    return SimpleNamespace(dir=d, base=d / "model", adapter=adapter, run=adapter.parent)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def refused(proc, *names: str) -> None:
    """Exit code 2, every name in the message, and no traceback."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Traceback" not in text, text
    for name in names:
        assert name in text, (name, text)


def truncate(file: Path, size: int) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:size if size > 0 else len(data) + size])


@pytest.mark.parametrize("cut", [100, -1000], ids=["header-cut", "data-cut"])
def test_hf_checkpoint_with_truncated_weights(ws, tmp_path, cli, cut):
    model = copy(ws.base, tmp_path / "model")
    truncate(model / "model.safetensors", cut)
    refused(cli("chat", model, "hello"), str(model / "model.safetensors"))


def test_hf_checkpoint_with_only_pickle_weights_is_refused(ws, tmp_path, cli):
    model = copy(ws.base, tmp_path / "model")
    (model / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, model / "pytorch_model.bin")
    refused(cli("chat", model, "hello"), "pytorch_model.bin", "pickle")


def _damaged_adapter(ws, tmp_path, damage: str) -> tuple[Path, str]:
    adapter = copy(ws.adapter, tmp_path / "adapter")
    if damage == "config-not-json":
        (adapter / "adapter_config.json").write_text('{"r": 16,\n  oops')
        return adapter, "adapter_config.json"
    if damage == "weights-truncated":
        truncate(adapter / "adapter_model.safetensors", -100)
        return adapter, "adapter_model.safetensors"
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, adapter / "adapter_model.bin")
    return adapter, "adapter_model.bin"


@pytest.mark.parametrize("damage", ["config-not-json", "weights-truncated", "pickle-weights"])
def test_damaged_adapter_in_chat_and_merge(ws, tmp_path, cli, damage):
    adapter, name = _damaged_adapter(ws, tmp_path, damage)
    refused(cli("chat", adapter, "hello"), name)
    refused(cli("merge", adapter, tmp_path / "out"), name)
    assert not (tmp_path / "out").exists()


def _other_shapes_base(ws, dest: Path) -> Path:
    """The demo model with a wider MLP: same names, other shapes."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = InternVLConfig.from_pretrained(ws.base)
    config.text_config.intermediate_size *= 2
    shutil.copytree(ws.base, dest, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    InternVLForConditionalGeneration(config).save_pretrained(dest)
    return dest


def test_adapter_on_a_base_of_other_shapes(ws, tmp_path, cli):
    other = _other_shapes_base(ws, tmp_path / "other")
    weights = str(ws.adapter / "adapter_model.safetensors")
    refused(cli("chat", ws.adapter, "hello", "--base", other), weights, "wrong base model?")
    refused(cli("merge", ws.adapter, tmp_path / "out", "--base", other), weights, "wrong base model?")


def test_merge_onto_a_base_whose_config_is_not_json(ws, tmp_path, cli):
    base = copy(ws.base, tmp_path / "base")
    (base / "config.json").write_text("{not json")
    refused(cli("merge", ws.adapter, tmp_path / "out", "--base", base), str(base / "config.json"))


def test_merge_into_an_output_that_cannot_be_written(ws, tmp_path, cli):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    refused(cli("merge", ws.adapter, blocker / "out"), str(blocker / "out"), "not a folder")


def test_base_fingerprint_is_recorded_and_checked(ws, tmp_path, cli):
    meta = json.loads((ws.adapter / "internvl_lora.json").read_text())
    assert meta["base_fingerprint"]
    changed = copy(ws.base, tmp_path / "changed")  # same shapes, another model (here: another config)
    cfg = json.loads((changed / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] = cfg["text_config"].get("rms_norm_eps", 1e-6) * 10
    (changed / "config.json").write_text(json.dumps(cfg))
    proc = cli("merge", ws.adapter, tmp_path / "out", "--base", changed)
    assert proc.returncode == 0, proc.stderr
    assert "not the one the adapter was trained on" in proc.stderr
    # the recorded base itself changed since training: refused
    adapter = copy(ws.adapter, tmp_path / "adapter")
    meta["base_model"] = str(changed)
    (adapter / "internvl_lora.json").write_text(json.dumps(meta))
    refused(cli("merge", adapter, tmp_path / "out2"), str(changed), "--base")
    # an old run folder without a fingerprint keeps working
    del meta["base_fingerprint"]
    (adapter / "internvl_lora.json").write_text(json.dumps(meta))
    assert cli("merge", adapter, tmp_path / "out3").returncode == 0


def test_trainer_checkpoint_finds_the_base_one_folder_up(ws, tmp_path, cli):
    ckpt = ws.run / "checkpoint-99"
    shutil.copytree(ws.adapter, ckpt, ignore=shutil.ignore_patterns("internvl_lora.json"))
    try:
        assert (ws.run / "internvl_lora.json").is_file()
        proc = cli("chat", ckpt, "hello", "--max-new-tokens", "2")
        assert proc.returncode == 0, proc.stderr
        proc = cli("merge", ckpt, tmp_path / "out")
        assert proc.returncode == 0, proc.stderr
    finally:
        shutil.rmtree(ckpt)


def test_data_check_with_an_adapter_folder_uses_its_base(ws, cli):
    proc = cli("data", "check", ws.dir / "data" / "meta.json", "--model", ws.adapter)
    assert proc.returncode in (0, 1), proc.stderr
    assert "Traceback" not in proc.stderr and "file not found" not in proc.stdout + proc.stderr
