"""Merge across checkpoint formats: an adapter trained on an ORIGINAL-format base merges back to original
keys (PEFT and streaming paths equal), reloads through our loader with the adapter model's logits, and
an InternLM2 base (fused `wqkv`) gets its q/k/v LoRA on the right row blocks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from internvl_lora.internvl.format.config_map import original_config_to_hf
from internvl_lora.internvl.format.keymap import hf_to_original_state_dict, split_grouped_qkv
from internvl_lora.internvl.format.save import convert_checkpoint
from internvl_lora.merge import merge

TRAIN = ["train.max_steps=4", "train.report_to=[]", "train.per_device_batch_size=4", "train.logging_steps=1",
         "train.save_steps=1000", "policy.vision=lora", "policy.projector=full"]
REMOTE_CODE = "modeling_internvl_chat.py"

pytestmark = pytest.mark.slow  # every test here needs the `orig` fixture: a training run (~15 s on 2 cores)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def orig(demo_folder, tmp_path_factory):
    """A tiny original-format checkpoint (converted from the tiny -hf one, plus a stand-in `.py`) and an
    adapter trained on it with LLM + vision LoRA and the projector in full."""
    import yaml

    from internvl_lora.config import load_config
    from internvl_lora.train import train

    d = tmp_path_factory.mktemp("formats")
    cfg_path = demo_folder(16, 4, copy_to=d) / "train.yaml"
    base = convert_checkpoint(d / "model", d / "original", "original", without_code=True)
    (base / REMOTE_CODE).write_text("# stands in for the remote code of a released checkpoint\n")
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["model"]["path"] = str(base)
    cfg["train"]["output_dir"] = str(d / "run")
    (d / "original.yaml").write_text(yaml.safe_dump(cfg))
    adapter = train(load_config(d / "original.yaml", TRAIN))
    return SimpleNamespace(dir=d, base=base, adapter=adapter)


def _probe_logits(model_dir: Path, adapter: Path | None, base: Path) -> torch.Tensor:
    """Logits of a probe with an image, computed here (not by merge's own check)."""
    from peft import PeftModel

    from internvl_lora.infer import build_inputs, settings_for
    from internvl_lora.internvl.checkpoint import inspect_checkpoint, load_model, load_tokenizer
    from internvl_lora.merge import logits_of, probe_image

    tok = load_tokenizer(base)
    settings = settings_for(inspect_checkpoint(base), None)
    img = model_dir.parent / "probe_e2e.png"
    probe_image(settings.tile_size).resize((150, 70)).save(img)
    ids, pixels = build_inputs("What is shown?", [str(img)], settings, tok)
    model = load_model(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    return logits_of(model, {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids)).long(),
                             "pixel_values": pixels})


def test_original_base_merges_back_to_original_keys(orig, tmp_path):
    out = tmp_path / "merged"
    report = merge(orig.adapter, out)
    assert report["ok"] and report["format"] == "original" and report["full_tensors"] == 6
    base_keys, merged = set(tensors(orig.base)), tensors(out)
    assert set(merged) == base_keys  # original names, same set, no LoRA keys
    assert any(k.endswith("attn.qkv.weight") for k in merged) and any(k.startswith("mlp1.") for k in merged)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "internvl_chat" and cfg["use_llm_lora"] == 0 and cfg["use_backbone_lora"] == 0
    assert cfg["template"] == "internvl2_5"
    for name in (REMOTE_CODE, "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    assert (out / REMOTE_CODE).read_text() == (orig.base / REMOTE_CODE).read_text()
    # the vision qkv (fused in the original format) and the LLM changed; the projector is the trained copy
    base = tensors(orig.base)
    assert not torch.equal(merged["vision_model.encoder.layers.0.attn.qkv.weight"],
                           base["vision_model.encoder.layers.0.attn.qkv.weight"])
    assert torch.equal(merged["vision_model.encoder.layers.0.attn.qkv.bias"],
                       base["vision_model.encoder.layers.0.attn.qkv.bias"])
    trained = load_file(str(orig.adapter / "adapter_model.safetensors"))
    assert torch.equal(merged["mlp1.1.weight"], trained["base_model.model.model.multi_modal_projector.linear_1.weight"])

    # it reloads through our loader with the adapter model's logits
    with_adapter = _probe_logits(orig.base, orig.adapter, orig.base)
    reloaded = _probe_logits(out, None, orig.base)
    without = _probe_logits(orig.base, None, orig.base)
    assert (with_adapter - reloaded).abs().max() < 1e-4 * max(1.0, float(with_adapter.abs().max()))
    assert (with_adapter - without).abs().max() > 1e-2

    # chat: the merged original checkpoint answers as the adapter folder does
    from internvl_lora.chat import ChatSession
    from internvl_lora.infer import load_for_inference

    img = str(next((orig.dir / "data" / "images").glob("*.png")))
    loaded = {name: load_for_inference(path) for name, path in (("adapter", orig.adapter), ("merged", out))}
    answers = {name: [ChatSession(m, [img], max_new_tokens=8).ask(q) for q in ("What color is it?", "Describe.")]
               for name, m in loaded.items()}
    assert answers["adapter"] == answers["merged"]

    # the streaming path writes the same tensors and the same side files
    streamed = tmp_path / "streamed"
    s_report = merge(orig.adapter, streamed, streaming=True)
    assert s_report["ok"] and s_report["fused_tensors_rebuilt"] == 2  # one vision qkv per layer
    other = tensors(streamed)
    assert set(other) == set(merged)
    assert max(float((other[k] - merged[k]).abs().max()) for k in merged) <= 1e-6
    for name in ("config.json", "generation_config.json", REMOTE_CODE, "tokenizer.json"):
        assert (streamed / name).read_bytes() == (out / name).read_bytes(), name


# ------------------------------------------------------------------------------ InternLM2 (fused wqkv)


def _internlm2_checkpoint(src_original: Path, tiny_hf: Path, folder: Path) -> Path:
    """A random tiny InternLM2-based original checkpoint (4 query heads, 2 KV heads: grouped wqkv)."""
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    cfg = json.loads((src_original / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_hf)
    vocab = cfg["llm_config"]["vocab_size"]
    cfg["llm_config"] = {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_size": 64,
        "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "vocab_size": vocab, "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "bias": False, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
        "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"), "pad_token_id": tok.pad_token_id,
    }
    cfg["template"] = "internlm2-chat"
    hf_cfg = original_config_to_hf(cfg, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(hf_cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    folder.mkdir()
    save_file(hf_to_original_state_dict(model.state_dict(), cfg), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", REMOTE_CODE):
        src = (tiny_hf / name) if (tiny_hf / name).exists() else (src_original / name)
        shutil.copy(src, folder / name)
    return folder


def test_internlm2_fused_wqkv_streaming_equals_peft(orig, tmp_path):
    """LoRA on q and v (not k) of an InternLM2 base, rsLoRA with rank/alpha patterns, LoRA on the vision
    q/k, and the projector in full: the streaming merge (split wqkv, add, fuse back) equals PEFT's."""
    from peft import LoraConfig, get_peft_model

    from internvl_lora.internvl.checkpoint import load_model

    base = _internlm2_checkpoint(orig.base, orig.dir / "model", tmp_path / "internlm2")
    model = load_model(base)
    config = LoraConfig(
        r=4, lora_alpha=6, use_rslora=True, init_lora_weights=False, rank_pattern={"o_proj": 2},
        alpha_pattern={"v_proj": 3}, modules_to_save=["multi_modal_projector"],
        target_modules=r"(model\.language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj|o_proj)"
                       r"|model\.vision_tower\.encoder\.layer\.\d+\.attention\.(q_proj|k_proj))",
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        peft_model.base_model.model.model.multi_modal_projector.modules_to_save["default"].linear_1.weight.add_(0.05)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    (adapter / "internvl_lora.json").write_text(json.dumps({"base_model": str(base), "template": "internlm2-chat"}))

    peft_out, stream_out = tmp_path / "peft", tmp_path / "stream"
    r1 = merge(adapter, peft_out)
    r2 = merge(adapter, stream_out, streaming=True)
    assert r1["ok"] and r2["ok"] and r2["fused_tensors_rebuilt"] == 4  # 2 wqkv + 2 vision qkv
    a, b, src = tensors(peft_out), tensors(stream_out), tensors(base)
    assert set(a) == set(b) == set(src)
    assert "language_model.model.layers.0.attention.wqkv.weight" in a
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6

    # the k rows of the fused wqkv are untouched, the q and v rows moved (grouped layout, 2 KV groups)
    q, k, v = split_grouped_qkv(b["language_model.model.layers.0.attention.wqkv.weight"], 4, 2)
    q0, k0, v0 = split_grouped_qkv(src["language_model.model.layers.0.attention.wqkv.weight"], 4, 2)
    assert torch.equal(k, k0) and not torch.equal(q, q0) and not torch.equal(v, v0)
    # and by the right amount: rsLoRA scale alpha / sqrt(r), with v's alpha from the pattern
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    pre = "base_model.model.model.language_model.layers.0.self_attn."
    dv = lora[pre + "v_proj.lora_B.weight"] @ lora[pre + "v_proj.lora_A.weight"] * (3 / 4 ** 0.5)
    assert torch.allclose(v, v0 + dv, atol=1e-6)
    do = lora[pre + "o_proj.lora_B.weight"] @ lora[pre + "o_proj.lora_A.weight"] * (6 / 2 ** 0.5)
    assert torch.allclose(b["language_model.model.layers.0.attention.wo.weight"],
                          src["language_model.model.layers.0.attention.wo.weight"] + do, atol=1e-6)
    cfg = json.loads((stream_out / "config.json").read_text())
    assert cfg["llm_config"]["architectures"] == ["InternLM2ForCausalLM"] and cfg["use_llm_lora"] == 0
    assert (stream_out / REMOTE_CODE).is_file() and (peft_out / REMOTE_CODE).is_file()


def test_preference_training_on_an_original_format_base_merges_back_to_it(orig, tmp_path):
    """train.objective=mpo on the original-format base (vision LoRA, projector in full: the reference then
    has its own vision pass), merged back into original keys with the parity check."""
    from internvl_lora.config import load_config
    from internvl_lora.data.synthetic import make_preference_dataset
    from internvl_lora.run_dir import read_metrics
    from internvl_lora.train import train

    data = make_preference_dataset(tmp_path / "pairs", n_train=8, n_heldout=2)
    adapter = train(load_config(orig.dir / "original.yaml", TRAIN + [
        "train.objective=mpo", f"data.meta={data / 'meta.json'}", f"train.output_dir={tmp_path / 'run'}"]))
    logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(logged) == 4 and all("rewards/accuracy" in r for r in logged)
    merged = tmp_path / "merged"
    merge(adapter, merged)  # its parity check compares the merged model with the adapter model
    assert (merged / REMOTE_CODE).exists()
    assert not any(k.startswith(("model.", "lm_head")) for k in tensors(merged))  # original keys
