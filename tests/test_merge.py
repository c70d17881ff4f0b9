"""merge: PEFT and streaming paths, parity check, refusals, atomic output (exceptions, Ctrl-C, SIGKILL).

One tiny -hf model and one adapter trained for a few steps with LoRA on the LLM *and* the vision tower
and the projector trained in full (PEFT modules_to_save), shared by the module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from internvl_lora import merge as merge_mod
from internvl_lora.errors import UserError
from internvl_lora.merge import STAGING_INFIX, STAGING_MARKER, merge

TRAIN = ["train.max_steps=4", "train.report_to=[]", "train.per_device_batch_size=4", "train.logging_steps=1",
         "train.save_steps=1000"]
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def ws(demo_folder, tmp_path_factory):
    from internvl_lora.config import load_config
    from internvl_lora.train import train

    d = tmp_path_factory.mktemp("merge")
    cfg = demo_folder(16, 4, copy_to=d) / "train.yaml"
    adapter = train(load_config(cfg, TRAIN + ["policy.vision=lora", "policy.projector=full"]))
    merged = d / "merged"
    report = merge(adapter, merged)
    return SimpleNamespace(dir=d, base=d / "model", adapter=adapter, merged=merged, report=report)


def staging_of(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}{STAGING_INFIX}*"))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ------------------------------------------------------------------------------------- PEFT path


def test_merge_writes_a_complete_hf_checkpoint(ws):
    out, report = ws.merged, ws.report
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "preprocessor_config.json", "internvl_lora.json", "merge_report.json"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors"}
    assert json.loads((out / "merge_report.json").read_text()) == report
    assert report["ok"] and report["mode"] == "peft" and report["format"] == "hf"
    assert report["lora_modules"] == 3 * 7 + 2 * 6 and report["full_tensors"] == 6  # LLM + vision LoRA, projector
    assert report["max_abs_diff_adapter_vs_merged"] <= report["tolerance"]
    assert report["max_abs_diff_merged_vs_base"] > 1e-3
    assert report["max_abs_diff_reloaded_vs_merged"] == 0.0
    meta = json.loads((out / "internvl_lora.json").read_text())
    assert meta["merged_from"] == str(ws.adapter.resolve()) and meta["base_model"] == str(ws.base.resolve())
    gen = json.loads((out / "generation_config.json").read_text())
    from transformers import AutoTokenizer

    im_end = AutoTokenizer.from_pretrained(ws.base).convert_tokens_to_ids("<|im_end|>")
    assert im_end in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])
    assert not staging_of(out)


def test_merged_weights_are_w_plus_scaled_ba(ws):
    """Independent of PEFT: every LoRA weight is W + alpha/r * B @ A, the projector is the trained copy,
    everything else is the base, and no LoRA tensor is left."""
    base, merged = tensors(ws.base), tensors(ws.merged)
    assert set(base) == set(merged) and not any("lora" in k or "base_layer" in k for k in merged)
    from internvl_lora.internvl.format.adapter import hf_native_name

    ad = load_file(str(ws.adapter / "adapter_model.safetensors"))
    acfg = json.loads((ws.adapter / "adapter_config.json").read_text())
    scale = acfg["lora_alpha"] / acfg["r"]
    checked = {"llm": 0, "vision": 0, "projector": 0, "unchanged": 0}
    for key, w in base.items():
        name = hf_native_name(key)
        a = ad.get(f"{PREFIX}{name[:-len('.weight')]}.lora_A.weight")
        full = ad.get(f"{PREFIX}{name}")
        if a is not None:
            b = ad[f"{PREFIX}{name[:-len('.weight')]}.lora_B.weight"]
            expected = w + (b @ a) * scale
            assert torch.allclose(merged[key], expected, atol=1e-6, rtol=0), key
            assert not torch.equal(merged[key], w), key
            checked["vision" if "vision" in key else "llm"] += 1
        elif full is not None:
            assert torch.equal(merged[key], full), key
            checked["projector"] += 1
        else:
            assert torch.equal(merged[key], w), key
            checked["unchanged"] += 1
    assert checked["llm"] == 21 and checked["vision"] == 12 and checked["projector"] == 6 and checked["unchanged"] > 0


# -------------------------------------------------------------------------------- streaming path


def test_streaming_equals_peft_on_a_sharded_base(ws, tmp_path):
    """Re-shard the base into 3 files: the streaming merge keeps the layout and equals the PEFT merge."""
    base3 = tmp_path / "base3"
    shutil.copytree(ws.base, base3)
    (base3 / "model.safetensors").unlink()
    state = tensors(ws.base)
    names = sorted(state)
    weight_map = {}
    for i in range(3):
        file = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: state[k] for k in names[i::3]}, str(base3 / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in names[i::3]})
    (base3 / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    out = tmp_path / "streamed"
    report = merge(ws.adapter, out, base=base3, streaming=True)
    assert report["ok"] and report["mode"] == "streaming" and report["shards"] == 3
    assert report["lora_weights_merged"] == 33 and report["full_tensors_replaced"] == 6
    assert report["max_abs_diff_adapter_vs_merged"] <= report["tolerance"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(set(weight_map.values()))
    peft_out, streamed = tensors(ws.merged), tensors(out)
    assert set(peft_out) == set(streamed)
    worst = max(float((peft_out[k] - streamed[k]).abs().max()) for k in peft_out)
    assert worst <= 1e-6, worst
    assert json.loads((out / "internvl_lora.json").read_text())["base_model"] == str(base3.resolve())


def test_streaming_never_builds_the_model(ws, tmp_path, monkeypatch):
    """Without the parity check, the streaming merge reads shards only: no model is ever constructed,
    and what it holds at once is one shard."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("the streaming merge built a model")

    monkeypatch.setattr(transformers.InternVLForConditionalGeneration, "__init__", refuse)
    monkeypatch.setattr(merge_mod, "load_model", refuse)
    report = merge(ws.adapter, tmp_path / "out", streaming=True, check=False)
    assert report["parity_check"] == "skipped" and report["ok"]
    assert report["largest_shard_bytes"] == (ws.base / "model.safetensors").stat().st_size - _header_bytes(
        ws.base / "model.safetensors")
    assert torch.equal(tensors(tmp_path / "out")["vision_tower.encoder.layer.0.attention.q_proj.weight"],
                       tensors(ws.merged)["vision_tower.encoder.layer.0.attention.q_proj.weight"])


def _header_bytes(file: Path) -> int:
    import struct

    with open(file, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def test_dora_streaming_refused_peft_merges(ws, tmp_path):
    from peft import LoraConfig, get_peft_model

    from internvl_lora.internvl.checkpoint import load_model

    model = load_model(ws.base)
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                     target_modules=r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)")
    peft_model = get_peft_model(model, cfg)
    dora = tmp_path / "dora"
    peft_model.save_pretrained(dora)
    shutil.copy(ws.adapter / "internvl_lora.json", dora / "internvl_lora.json")
    with pytest.raises(UserError, match="DoRA"):
        merge(dora, tmp_path / "s", streaming=True)
    assert not (tmp_path / "s").exists() and not staging_of(tmp_path / "s")
    report = merge(dora, tmp_path / "p")
    assert report["ok"] and report["max_abs_diff_merged_vs_base"] > 1e-3


# ------------------------------------------------------------------------------------ parity check


def _zero_b_copy(ws, dest: Path) -> Path:
    shutil.copytree(ws.adapter, dest)
    f = dest / "adapter_model.safetensors"
    state = load_file(str(f))
    state = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in state.items() if "multi_modal" not in k}
    save_file(state, str(f))
    acfg = json.loads((dest / "adapter_config.json").read_text())
    acfg["modules_to_save"] = None
    (dest / "adapter_config.json").write_text(json.dumps(acfg))
    return dest


@pytest.mark.parametrize("streaming", [False, True])
def test_untrained_adapter_is_refused(ws, tmp_path, streaming):
    untrained = _zero_b_copy(ws, tmp_path / "untrained")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="learned nothing") as e:
        merge(untrained, out, streaming=streaming)
    assert "nothing was written" in str(e.value)
    assert not out.exists() and not staging_of(out)


def test_parity_check_catches_a_zero_adapter_that_passes_the_precheck(ws, tmp_path, monkeypatch):
    """Logit check 2 on its own: the all-zero precheck is bypassed, the merged model equals the base."""
    untrained = _zero_b_copy(ws, tmp_path / "untrained")
    monkeypatch.setattr(merge_mod, "_learned_nothing", lambda adapter: None)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="equals the base"):
        merge(untrained, out)
    assert not out.exists() and not staging_of(out)


def test_parity_check_catches_merge_drift(ws, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel

    real = LoraModel.merge_and_unload

    def drifting(self, *a, **k):
        model = real(self, *a, **k)
        with torch.no_grad():
            model.model.language_model.layers[1].mlp.down_proj.weight.mul_(1.05)
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", drifting)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="differ from the adapter model"):
        merge(ws.adapter, out)
    assert not out.exists() and not staging_of(out)


def test_parity_check_catches_a_bad_save(ws, tmp_path, monkeypatch):
    real = merge_mod.save_checkpoint

    def lossy(model, tokenizer, base, fmt, out, dtype):
        real(model, tokenizer, base, fmt, out, dtype)
        f = out / "model.safetensors"
        state = load_file(str(f))
        state["multi_modal_projector.linear_2.weight"] = state["multi_modal_projector.linear_2.weight"].half().float() * 0.9
        save_file(state, str(f), metadata={"format": "pt"})

    monkeypatch.setattr(merge_mod, "save_checkpoint", lossy)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="reloads with logits"):
        merge(ws.adapter, out)
    assert not out.exists() and not staging_of(out)


def test_bfloat16_on_cpu(ws, tmp_path):
    out = tmp_path / "bf16"
    report = merge(ws.adapter, out, dtype="bfloat16")
    assert report["ok"] and report["dtype"] == "bfloat16"
    assert report["max_abs_diff_adapter_vs_merged"] <= report["tolerance"] < 0.5
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# --------------------------------------------------------------------------------- atomic output


def test_refuses_to_overwrite_or_replace_inputs(ws, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        merge(ws.adapter, out)
    assert (out / "keep.txt").read_text() == "x"
    with pytest.raises(UserError, match="replace the input"):
        merge(ws.adapter, ws.adapter, overwrite=True)
    with pytest.raises(UserError, match="replace the input"):
        merge(ws.adapter, ws.dir, overwrite=True)  # a parent of the inputs
    report = merge(ws.adapter, out, overwrite=True, streaming=True, check=False)
    assert report["ok"] and not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not staging_of(out)


def test_ctrl_c_while_saving_leaves_nothing(ws, tmp_path, monkeypatch):
    real = merge_mod.save_checkpoint
    seen = {}

    def broken(model, tokenizer, base, fmt, out, dtype):
        real(model, tokenizer, base, fmt, out, dtype)  # the weights are on disk ...
        seen["staging"] = out.parent
        assert (out / "model.safetensors").is_file()
        raise KeyboardInterrupt  # ... when the merge is cut short

    monkeypatch.setattr(merge_mod, "save_checkpoint", broken)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        merge(ws.adapter, out)
    assert not out.exists() and not seen["staging"].exists() and not staging_of(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_interrupted_streaming_leaves_nothing(ws, tmp_path, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def disk_full(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space"):
        merge(ws.adapter, out, streaming=True)
    assert not out.exists() and sorted(tmp_path.iterdir()) == []


KILLABLE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import safetensors.torch
    from internvl_lora.merge import merge

    real = safetensors.torch.save_file

    def slow(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        Path(sys.argv[3]).write_text("a shard is written")
        time.sleep(300)

    safetensors.torch.save_file = slow
    merge(sys.argv[1], sys.argv[2], streaming=True, check=False)
""")


@pytest.mark.slow
def test_sigkill_mid_merge_leaves_no_output_and_the_next_merge_cleans_up(ws, tmp_path):
    out, ready = tmp_path / "out", tmp_path / "ready"
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE)
    proc = subprocess.Popen([sys.executable, str(script), str(ws.adapter), str(out), str(ready)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the merge never reached the save"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert not out.exists()
    [left] = staging_of(out)
    assert left.name.startswith(f".{out.name}{STAGING_INFIX}{proc.pid}-")
    assert (left / STAGING_MARKER).is_file() and "not a checkpoint" in (left / STAGING_MARKER).read_text()
    assert not (left / "config.json").exists()  # a loader pointed at it finds no checkpoint
    assert (left / "checkpoint" / "model.safetensors").is_file()  # it really was killed mid-way

    # a staging folder of a live merge (here: our parent process) is left alone
    live = tmp_path / f".{out.name}{STAGING_INFIX}{os.getppid()}-0abc"
    live.mkdir()
    report = merge(ws.adapter, out, streaming=True, check=False)
    assert report["ok"] and (out / "model.safetensors").is_file()
    assert staging_of(out) == [live]
