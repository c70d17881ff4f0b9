"""Original (remote-code) InternVL checkpoints <-> native transformers InternVL: configs, keys, files."""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from internvl_lora.errors import CheckpointError
from internvl_lora.internvl.format.adapter import convert_adapter, pattern_value
from internvl_lora.internvl.format.config import original_llm_type
from internvl_lora.internvl.format.config_map import original_config_to_hf
from internvl_lora.internvl.format.keymap import (
    fuse_grouped_qkv, hf_key_to_original, hf_to_original_state_dict, original_key_to_hf, original_to_hf_state_dict,
    split_grouped_qkv,
)
from internvl_lora.internvl.format.load import load_original_model
from internvl_lora.internvl.format.safetensors import read_safetensors_header, weight_files
from internvl_lora.internvl.format.save import convert_checkpoint, save_original
from internvl_lora.internvl.format.tokenizer import load_original_tokenizer

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "real"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"real fixtures not found at {FIXTURES}")

IMAGE_TOKEN = 100  # in the shrunk vocabularies below


def _real_config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


def shrink(cfg: dict, *, heads: int, kv_heads: int, head_dim: int = 8, vocab: int = 128) -> dict:
    """A real original config made tiny: 2 layers each side, 56-px tiles, same head/KV-head layout."""
    cfg = copy.deepcopy(cfg)
    cfg["force_image_size"] = 56
    vc = cfg["vision_config"]
    vc.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=56)
    llm = cfg["llm_config"]
    llm.update(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
               intermediate_size=48, num_hidden_layers=2, vocab_size=vocab, max_position_embeddings=512)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        llm[k] = 2
    return cfg


def tiny_configs() -> dict[str, dict]:
    """Shrunk versions of the real configs, one per LLM family and head layout."""
    return {
        "qwen2-InternVL2-1B": shrink(_real_config("InternVL2-1B"), heads=7, kv_heads=1),
        "qwen2-InternVL3-2B": shrink(_real_config("InternVL3-2B"), heads=6, kv_heads=1),
        "internlm2-InternVL2-2B": shrink(_real_config("InternVL2-2B"), heads=4, kv_heads=2),
        "internlm2-InternVL2_5-8B": shrink(_real_config("InternVL2_5-8B-MPO"), heads=8, kv_heads=2),
    }


def vit6b_style(cfg: dict) -> dict:
    """InternViT-6B settings (RMSNorm, q/k norm, no qkv bias) on a tiny config."""
    cfg = copy.deepcopy(cfg)
    cfg["vision_config"].update(norm_type="rms_norm", qk_normalization=True, qkv_bias=False)
    return cfg


def synthetic_llm_config(arch: str) -> dict:
    """A tiny original config whose LLM is a family with no real config file here (InternVL2-4B, 3.5)."""
    from transformers import GptOssConfig, Phi3Config, Qwen3Config

    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "Qwen3ForCausalLM":
        llm = Qwen3Config(head_dim=8, **common).to_dict()
    elif arch == "GptOssForCausalLM":
        llm = GptOssConfig(head_dim=8, num_local_experts=4, num_experts_per_tok=2, **common).to_dict()
    else:
        llm = Phi3Config(**common).to_dict()
    llm["architectures"] = [arch]
    cfg = shrink(_real_config("InternVL3-2B"), heads=4, kv_heads=2)
    cfg["llm_config"] = llm
    return cfg


def moe_config() -> dict:
    """A synthetic InternVL3.5-style config with a Qwen3-MoE LLM (no real file is available)."""
    from transformers import Qwen3MoeConfig

    base = shrink(_real_config("InternVL3-2B"), heads=4, kv_heads=2)
    llm = Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                         num_experts_per_tok=2, vocab_size=128, bos_token_id=2, eos_token_id=2,
                         pad_token_id=2).to_dict()
    llm["architectures"] = ["Qwen3MoeForCausalLM"]
    base["llm_config"] = llm
    return base


def random_native(cfg: dict, seed: int = 0):
    """A native model for an original config, every parameter random (not the init's constants)."""
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration(original_config_to_hf(cfg, image_token_id=IMAGE_TOKEN))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def write_original(folder: Path, cfg: dict, model, *, shards: int = 1, extras: bool = True) -> Path:
    """An original-format checkpoint folder: config.json, safetensors (single or sharded), a .py file."""
    folder.mkdir(parents=True, exist_ok=True)
    state = hf_to_original_state_dict(model.state_dict(), cfg)
    names = sorted(state)
    if shards == 1:
        save_file({k: state[k].clone() for k in names}, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k].clone() for k in part}, str(folder / file))
            weight_map.update({k: file for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    if extras:
        (folder / "modeling_internvl_chat.py").write_text("raise RuntimeError('checkpoint code must never run')\n")
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"}))
    return folder


def sample_inputs(model, tiles: int = 2):
    gen = torch.Generator().manual_seed(1)
    per_tile = model.config.image_seq_length
    ids = [1, 5, 6] + [IMAGE_TOKEN] * (per_tile * tiles) + [7, 8, 9, 10]
    pixel_values = torch.randn(tiles, 3, 56, 56, generator=gen)
    return torch.tensor([ids]), pixel_values


def logits(model, ids, pixel_values):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixel_values).logits


# --------------------------------------------------------------------------------------------------
# Real configs
# --------------------------------------------------------------------------------------------------


@needs_fixtures
def test_every_real_config_converts_or_is_refused_cleanly():
    from transformers import InternVLForConditionalGeneration

    files = sorted(FIXTURES.rglob("config.json"))
    assert len(files) >= 7
    covered, refused = {}, {}
    for path in files:
        cfg = json.loads(path.read_text())
        rel = str(path.relative_to(FIXTURES))
        if "llm_config" not in cfg:  # the LLM-only GPTQ config of InternVL3_5-1B
            with pytest.raises(CheckpointError, match=re.escape(str(path))):
                original_config_to_hf(cfg, path)
            refused[rel] = cfg.get("model_type")
            continue
        hf = original_config_to_hf(cfg, path)
        assert hf.tie_word_embeddings == bool(cfg["llm_config"].get("tie_word_embeddings", False))
        assert hf.image_seq_length == 256 and hf.vision_feature_layer == -1
        assert hf.vision_config.image_size == (448, 448) and hf.vision_config.attention_bias
        with torch.device("meta"):
            model = InternVLForConditionalGeneration(hf)
        assert model.lm_head.weight.shape[0] == cfg["llm_config"]["vocab_size"]
        covered[rel] = (original_llm_type(cfg), hf.image_token_id)
    assert covered["InternVL2-1B/config.json"] == ("qwen2", 151648)
    assert covered["InternVL2-2B/config.json"] == ("llama", 92546)
    assert covered["InternVL2_5-8B-MPO/config.json"] == ("llama", 92546)
    assert covered["InternVL3-2B/config.json"] == ("qwen2", 151667)
    assert set(refused) == {"InternVL3_5-1B/variants/ax-llm-internvl3-5_tokenizer/config.json"}


@needs_fixtures
def test_internlm2_text_config_keeps_rope_and_heads():
    hf = original_config_to_hf(_real_config("InternVL2-2B"))
    text = hf.text_config
    assert text.model_type == "llama"
    assert text.rope_parameters["rope_type"] == "dynamic" and text.rope_parameters["factor"] == 2.0
    assert float(text.rope_parameters["rope_theta"]) == 1e6
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (16, 8, 92553)
    assert text.rms_norm_eps == 1e-5 and not text.attention_bias and not text.mlp_bias
    assert hf.tie_word_embeddings is False


@needs_fixtures
def test_index_of_internvl2_5_8b_maps_exactly_onto_native_parameters():
    from transformers import InternVLForConditionalGeneration

    cfg = _real_config("InternVL2_5-8B-MPO")
    names = json.loads((FIXTURES / "InternVL2_5-8B-MPO" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(names) == 573
    mapped = [h for n in names for h in original_key_to_hf(n, cfg)]
    assert len(mapped) == len(set(mapped)) == 573 + 32 * 2 + 24 * 2 * 2  # wqkv -> 3; vision qkv w+b -> 3
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(original_config_to_hf(cfg))
    assert set(mapped) == {n for n, _ in model.named_parameters()}
    # and back
    back = {o for h in mapped for o in hf_key_to_original(h, cfg)}
    assert back == set(names)


def test_llm_types_and_refusals(tmp_path):
    def cfg(arch):
        return {"model_type": "internvl_chat", "llm_config": {"architectures": [arch]}}

    assert original_llm_type(cfg("Qwen2ForCausalLM")) == "qwen2"
    assert original_llm_type(cfg("InternLM2ForCausalLM")) == "llama"
    assert original_llm_type(cfg("LlamaForCausalLM")) == "llama"
    assert original_llm_type(cfg("Qwen3ForCausalLM")) == "qwen3"
    assert original_llm_type(cfg("Qwen3MoeForCausalLM")) == "qwen3_moe"
    assert original_llm_type(cfg("GptOssForCausalLM")) == "gpt_oss"
    assert original_llm_type(cfg("Phi3ForCausalLM")) == "phi3"
    where = tmp_path / "config.json"
    with pytest.raises(CheckpointError, match=r"config\.json.*'MistralForCausalLM'"):
        original_llm_type(cfg("MistralForCausalLM"), where)


@needs_fixtures
def test_ps_version_v1_and_lora_flags_are_refused(tmp_path):
    cfg = _real_config("InternVL3-2B")
    with pytest.raises(CheckpointError, match="ps_version 'v1'"):
        original_config_to_hf({**cfg, "ps_version": "v1"}, tmp_path)
    absent = {k: v for k, v in cfg.items() if k != "ps_version"}
    with pytest.raises(CheckpointError, match="absent"):
        original_config_to_hf(absent, tmp_path)
    with pytest.raises(CheckpointError, match=r"config\.json: use_llm_lora=16.*[Mm]erge"):
        original_config_to_hf({**cfg, "use_llm_lora": 16}, tmp_path)


def test_phi3_maps_onto_native_fused_names():
    from transformers import InternVLForConditionalGeneration, Phi3Config

    llm = Phi3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2).to_dict()
    llm["architectures"] = ["Phi3ForCausalLM"]
    vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64,
              "image_size": 56, "patch_size": 14, "qkv_bias": True}
    cfg = {"model_type": "internvl_chat", "ps_version": "v2", "force_image_size": 56, "llm_config": llm,
           "vision_config": vision}
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(original_config_to_hf(cfg, image_token_id=IMAGE_TOKEN))
    names = {n for n, _ in model.named_parameters()}
    assert "model.language_model.layers.0.self_attn.qkv_proj.weight" in names
    assert original_key_to_hf("language_model.model.layers.0.mlp.gate_up_proj.weight", cfg) == [
        "model.language_model.layers.0.mlp.gate_up_proj.weight"]


# --------------------------------------------------------------------------------------------------
# Tensor mapping
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 2), (6, 6), (4, 1)])
def test_internlm2_split_and_fuse_are_inverses(heads, kv_heads):
    head_dim, hidden = 4, 12
    rows = (heads + 2 * kv_heads) * head_dim
    w = torch.randn(rows, hidden)
    q, k, v = split_grouped_qkv(w, heads, kv_heads)
    assert q.shape == (heads * head_dim, hidden) and k.shape == v.shape == (kv_heads * head_dim, hidden)
    assert torch.equal(fuse_grouped_qkv(q, k, v, heads, kv_heads), w)
    b = torch.randn(rows)
    assert torch.equal(fuse_grouped_qkv(*split_grouped_qkv(b, heads, kv_heads), heads, kv_heads), b)


def test_internlm2_split_matches_the_activation_side_rearrangement():
    """InternLM2's forward splits wqkv(x) per KV group: (h, groups + 2, d) with Q first, then K, then V.
    The weight split must give the same q/k/v projections, query head j belonging to KV head j // groups."""
    heads, kv_heads, d, hidden = 8, 2, 4, 16
    groups = heads // kv_heads
    w = torch.randn((heads + 2 * kv_heads) * d, hidden, dtype=torch.float64)
    x = torch.randn(3, hidden, dtype=torch.float64)
    fused = (x @ w.T).reshape(3, kv_heads, groups + 2, d)
    q_ref = fused[:, :, :groups].reshape(3, heads * d)
    k_ref, v_ref = fused[:, :, -2].reshape(3, kv_heads * d), fused[:, :, -1].reshape(3, kv_heads * d)
    q, k, v = split_grouped_qkv(w, heads, kv_heads)
    assert torch.allclose(x @ q.T, q_ref) and torch.allclose(x @ k.T, k_ref) and torch.allclose(x @ v.T, v_ref)


@needs_fixtures
@pytest.mark.parametrize("name", ["qwen2-InternVL2-1B", "qwen2-InternVL3-2B", "internlm2-InternVL2-2B",
                                  "internlm2-InternVL2_5-8B"])
def test_native_original_native_is_bit_identical(name):
    cfg = tiny_configs()[name]
    state = random_native(cfg).state_dict()
    original = hf_to_original_state_dict(state, cfg)
    if name.startswith("internlm2"):
        assert any(k.endswith("attention.wqkv.weight") for k in original)
        assert "language_model.output.weight" in original
    else:
        assert "language_model.model.layers.0.self_attn.q_proj.weight" in original
    assert "vision_model.encoder.layers.1.attn.qkv.bias" in original and "mlp1.3.weight" in original
    back = original_to_hf_state_dict(original, cfg)
    assert set(back) == set(state)
    for k, v in state.items():
        assert torch.equal(back[k], v), k


@needs_fixtures
def test_moe_experts_stack_and_unstack():
    from transformers import InternVLForConditionalGeneration

    cfg = moe_config()
    model = InternVLForConditionalGeneration(original_config_to_hf(cfg, image_token_id=IMAGE_TOKEN))
    state = model.state_dict()
    original = hf_to_original_state_dict(state, cfg)
    assert "language_model.model.layers.1.mlp.experts.3.up_proj.weight" in original
    assert original["language_model.model.layers.1.mlp.experts.3.up_proj.weight"].shape == (16, 32)
    back = original_to_hf_state_dict(original, cfg)
    assert all(torch.equal(back[k], v) for k, v in state.items()) and set(back) == set(state)
    assert original_key_to_hf("language_model.model.layers.0.mlp.experts.2.gate_proj.weight", cfg) == [
        "model.language_model.layers.0.mlp.experts.gate_up_proj"]


@needs_fixtures
@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "GptOssForCausalLM", "Phi3ForCausalLM"])
def test_other_llm_families_round_trip(arch):
    cfg = synthetic_llm_config(arch)
    state = random_native(cfg).state_dict()
    original = hf_to_original_state_dict(state, cfg)
    llm_keys = [k for k in original if k.startswith("language_model.")]
    assert llm_keys and all(k.startswith(("language_model.model.", "language_model.lm_head.")) for k in llm_keys)
    back = original_to_hf_state_dict(original, cfg)
    assert set(back) == set(state) and all(torch.equal(back[k], v) for k, v in state.items())


@needs_fixtures
def test_vit_6b_style_vision_loads_with_the_same_logits(tmp_path):
    cfg = vit6b_style(tiny_configs()["qwen2-InternVL3-2B"])
    native = random_native(cfg)
    state = native.state_dict()
    assert "model.vision_tower.encoder.layer.0.attention.q_norm.weight" in state
    original = hf_to_original_state_dict(state, cfg)
    assert "vision_model.encoder.layers.0.attn.k_norm.weight" in original
    assert "vision_model.encoder.layers.0.attn.qkv.bias" not in original
    loaded = load_original_model(write_original(tmp_path / "c", cfg, native), image_token_id=IMAGE_TOKEN)
    ids, pixels = sample_inputs(native)
    assert torch.equal(logits(loaded, ids, pixels), logits(native, ids, pixels))


def test_unknown_keys_are_reported():
    cfg = {"model_type": "internvl_chat", "llm_config": {"architectures": ["InternLM2ForCausalLM"]}}
    with pytest.raises(CheckpointError, match="language_model.model.layers.0.attention.rotary_x"):
        original_key_to_hf("language_model.model.layers.0.attention.rotary_x", cfg)
    assert original_key_to_hf("language_model.model.layers.0.attention.rotary_emb.inv_freq", cfg) == []


# --------------------------------------------------------------------------------------------------
# Loading and saving files
# --------------------------------------------------------------------------------------------------


@needs_fixtures
@pytest.mark.parametrize("name,shards", [("internlm2-InternVL2-2B", 3), ("qwen2-InternVL3-2B", 1),
                                         ("qwen2-InternVL2-1B", 2)])
def test_load_original_model_gives_the_same_logits(tmp_path, name, shards):
    cfg = tiny_configs()[name]
    native = random_native(cfg)
    folder = write_original(tmp_path / "ckpt", cfg, native, shards=shards)
    loaded = load_original_model(folder, dtype=torch.float32, image_token_id=IMAGE_TOKEN)
    ids, pixels = sample_inputs(native)
    assert torch.equal(logits(loaded, ids, pixels), logits(native, ids, pixels))
    loaded_state = loaded.state_dict()
    assert all(torch.equal(loaded_state[k], v) for k, v in native.state_dict().items())
    assert loaded.generation_config.eos_token_id == [2, 3]
    assert not loaded.training


@needs_fixtures
def test_tied_head_absent_from_checkpoint_is_tied_on_load(tmp_path):
    cfg = tiny_configs()["qwen2-InternVL2-1B"]  # llm_config ties the embeddings
    native = random_native(cfg)
    assert native.lm_head.weight is native.model.language_model.embed_tokens.weight
    folder = write_original(tmp_path / "ckpt", cfg, native)
    state = load_file(str(folder / "model.safetensors"))
    del state["language_model.lm_head.weight"]
    save_file(state, str(folder / "model.safetensors"))
    loaded = load_original_model(folder, image_token_id=IMAGE_TOKEN)
    assert loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight
    ids, pixels = sample_inputs(native)
    assert torch.equal(logits(loaded, ids, pixels), logits(native, ids, pixels))


@needs_fixtures
@pytest.mark.parametrize("name,shards", [("internlm2-InternVL2_5-8B", 2), ("qwen2-InternVL3-2B", 1)])
def test_save_original_reloads_identically(tmp_path, name, shards):
    cfg = tiny_configs()[name]
    native = random_native(cfg)
    source = write_original(tmp_path / "source", cfg, native, shards=shards)
    out = save_original(native, source, tmp_path / "merged")
    # same layout as the source: file names, key placement, index
    if shards > 1:
        src_index = json.loads((source / "model.safetensors.index.json").read_text())
        out_index = json.loads((out / "model.safetensors.index.json").read_text())
        assert out_index["weight_map"] == src_index["weight_map"]
        assert out_index["metadata"]["total_size"] > 0
    else:
        assert not (out / "model.safetensors.index.json").exists()
    written = weight_files(out)
    assert sorted(p.name for p in written) == sorted(p.name for p in weight_files(source))
    # bf16 from the source's torch_dtype
    header = read_safetensors_header(next(iter(written)))
    assert {dtype for dtype, _ in header.values()} == {"BF16"}
    saved_cfg = json.loads((out / "config.json").read_text())
    assert saved_cfg["use_llm_lora"] == 0 and saved_cfg["use_backbone_lora"] == 0
    assert saved_cfg["llm_config"] == cfg["llm_config"]
    for f in ("modeling_internvl_chat.py", "generation_config.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (source / f).read_bytes()
    reloaded = load_original_model(out, dtype=torch.float32, image_token_id=IMAGE_TOKEN)
    re_state = reloaded.state_dict()
    for k, v in native.state_dict().items():
        assert torch.equal(re_state[k], v.to(torch.bfloat16).to(torch.float32)), k
    # float32 on request is bit-identical
    out32 = save_original(native, source, tmp_path / "merged32", dtype=torch.float32)
    re32 = load_original_model(out32, image_token_id=IMAGE_TOKEN).state_dict()
    assert all(torch.equal(re32[k], v) for k, v in native.state_dict().items())
    assert not list(tmp_path.glob(".merged*"))  # no temporary folders left


@needs_fixtures
def test_save_original_from_a_source_without_weights_resets_lora_flags(tmp_path):
    cfg = tiny_configs()["internlm2-InternVL2-2B"]
    native = random_native(cfg)
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({**cfg, "use_llm_lora": 16}))
    (source / "modeling_internlm2.py").write_text("# code\n")
    out = save_original(native, source, tmp_path / "out", dtype="float32")
    saved = json.loads((out / "config.json").read_text())
    assert saved["use_llm_lora"] == 0 and (out / "modeling_internlm2.py").is_file()
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    re_state = load_original_model(out, image_token_id=IMAGE_TOKEN).state_dict()
    assert all(torch.equal(re_state[k], v) for k, v in native.state_dict().items())
    with pytest.raises(CheckpointError, match="not empty"):
        save_original(native, source, out)


@needs_fixtures
def test_save_original_refuses_a_model_of_another_shape(tmp_path):
    native = random_native(tiny_configs()["qwen2-InternVL3-2B"])
    source = write_original(tmp_path / "source", tiny_configs()["internlm2-InternVL2-2B"],
                            random_native(tiny_configs()["internlm2-InternVL2-2B"]))
    with pytest.raises(CheckpointError, match=r"config\.json: the model does not match"):
        save_original(native, source, tmp_path / "out")


@needs_fixtures
def test_convert_checkpoint_both_ways(tmp_path):
    from transformers import InternVLForConditionalGeneration

    cfg = tiny_configs()["internlm2-InternVL2-2B"]
    native = random_native(cfg)
    source = write_original(tmp_path / "orig", cfg, native, shards=2, extras=False)
    (source / "modeling_internvl_chat.py").write_text("# never imported\n")
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        shutil.copy(FIXTURES / "InternVL2-2B" / f, source / f)
    cfg_f32 = {**cfg, "torch_dtype": "float32"}
    (source / "config.json").write_text(json.dumps(cfg_f32))
    hf_dir = convert_checkpoint(source, tmp_path / "hf", to="hf")
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "internvl"
    hf_model = InternVLForConditionalGeneration.from_pretrained(hf_dir)
    assert hf_model.config.image_token_id == 92546  # from the real tokenizer files
    assert all(torch.equal(hf_model.state_dict()[k], v) for k, v in native.state_dict().items())
    assert json.loads((hf_dir / "preprocessor_config.json").read_text())["size"]["height"] == 56
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == 92546 and tok("hi")["input_ids"][0] == 1

    back = convert_checkpoint(hf_dir, tmp_path / "orig2", to="original", reference_original=source)
    for f in weight_files(source):
        a, b = load_file(str(f)), load_file(str(back / f.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (back / "modeling_internvl_chat.py").is_file()

    # without a reference a native "llama" is written as an original LlamaForCausalLM (same function)
    as_llama = convert_checkpoint(hf_dir, tmp_path / "orig3", to="original")
    llama_cfg = json.loads((as_llama / "config.json").read_text())
    assert llama_cfg["llm_config"]["architectures"] == ["LlamaForCausalLM"]
    assert llama_cfg["llm_config"]["rope_scaling"]["type"] == "dynamic"
    assert llama_cfg["template"] == "internlm2-chat"  # kept in the -hf config by the first conversion
    # the original's remote code, kept in hf/original_code/ by the first conversion, is put back
    assert [p.name for p in as_llama.glob("*.py")] == ["modeling_internvl_chat.py"]
    reloaded = load_original_model(as_llama)
    assert reloaded.config.image_token_id == 92546
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in native.state_dict().items())


@needs_fixtures
def test_convert_qwen2_hf_to_original_without_reference(tmp_path):
    cfg = tiny_configs()["qwen2-InternVL3-2B"]
    native = random_native(cfg)
    native.config.image_token_id = IMAGE_TOKEN
    native.save_pretrained(tmp_path / "hf")
    out = convert_checkpoint(tmp_path / "hf", tmp_path / "orig", to="original", without_code=True)
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "internvl_chat" and written["llm_config"]["architectures"] == ["Qwen2ForCausalLM"]
    assert written["ps_version"] == "v2" and written["force_image_size"] == 56
    loaded = load_original_model(out, image_token_id=IMAGE_TOKEN)
    ids, pixels = sample_inputs(native)
    assert torch.equal(logits(loaded, ids, pixels), logits(native, ids, pixels))


# ----- error cases: each names the file -----


@pytest.fixture
def checkpoint(tmp_path):
    if not FIXTURES.is_dir():
        pytest.skip(f"real fixtures not found at {FIXTURES}")
    cfg = tiny_configs()["internlm2-InternVL2-2B"]
    return write_original(tmp_path / "ckpt", cfg, random_native(cfg), shards=2), cfg


def test_missing_shard_is_named(checkpoint):
    folder, _ = checkpoint
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors.*missing"):
        load_original_model(folder, image_token_id=IMAGE_TOKEN)


def test_shape_mismatch_names_key_file_and_shapes(checkpoint):
    folder, cfg = checkpoint
    bad = copy.deepcopy(cfg)
    bad["llm_config"]["vocab_size"] = 130
    (folder / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=r"model-0000\d-of-00002\.safetensors: tensor 'language_model\.("
                                              r"model\.tok_embeddings|output)\.weight'.*\(128, 32\).*\(130, 32\)"):
        load_original_model(folder, image_token_id=IMAGE_TOKEN)


def test_lora_flags_are_refused(checkpoint):
    folder, cfg = checkpoint
    (folder / "config.json").write_text(json.dumps({**cfg, "use_llm_lora": 16}))
    with pytest.raises(CheckpointError, match=r"config\.json: use_llm_lora=16.*unmerged.*[Mm]erge it first"):
        load_original_model(folder)


def test_corrupt_safetensors_is_named(checkpoint):
    folder, _ = checkpoint
    shard = folder / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors.*(corrupt|truncated)"):
        load_original_model(folder, image_token_id=IMAGE_TOKEN)
    shard.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors"):
        load_original_model(folder, image_token_id=IMAGE_TOKEN)


def test_pickle_weights_are_refused(checkpoint):
    folder, _ = checkpoint
    for f in folder.glob("model*"):
        f.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*safetensors"):
        load_original_model(folder)


def test_unexpected_and_missing_keys_are_listed(checkpoint):
    folder, cfg = checkpoint
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = folder / "model-00001-of-00002.safetensors"
    state = load_file(str(shard))
    state["vision_model.encoder.layers.0.attn.extra.weight"] = torch.zeros(2)
    save_file(state, str(shard))
    index["weight_map"]["vision_model.encoder.layers.0.attn.extra.weight"] = shard.name
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"do not fit.*attn\.extra\.weight"):
        load_original_model(folder, image_token_id=IMAGE_TOKEN)
    del index["weight_map"]["vision_model.encoder.layers.0.attn.extra.weight"]
    dropped = "mlp1.1.weight"
    del index["weight_map"][dropped]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"not in the checkpoint: mlp1\.1\.weight"):
        load_original_model(folder, image_token_id=IMAGE_TOKEN)


def test_unmerged_lora_keys_are_refused(checkpoint):
    folder, cfg = checkpoint
    shard = folder / "model-00001-of-00002.safetensors"
    state = load_file(str(shard))
    key = "language_model.base_model.model.model.layers.0.attention.wqkv.lora_A.default.weight"
    state[key] = torch.zeros(2, 2)
    save_file(state, str(shard))
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][key] = shard.name
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="unmerged LoRA"):
        load_original_model(folder, image_token_id=IMAGE_TOKEN)


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------

TEXTS = [
    "Hello world",
    " leading space and  two spaces",
    "line one\nline two\n\n\tindented\r\nwindows",
    "你好，世界！这是一个测试。",
    "<|im_start|>system\n你是书生·万象<|im_end|>\n<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\n"
    "What is it?<|im_end|>\n<|im_start|>assistant\n",
    "digits 1234567890 and pi 3.14159",
    "emoji 😀🚀 and a rare 𠀋 character",
    "<s>bos in text</s> <unk> [UNUSED_TOKEN_12]",
    "def f(x):\n    return x ** 2  # code",
    "",
]


@functools.cache
def _sentencepiece(folder: Path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    added = {t["content"]: int(i) for i, t in
             json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"].items()}
    pattern = re.compile("(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")")
    return sp, added, pattern


def sentencepiece_reference(folder: Path, text: str) -> list[int]:
    """What the InternLM2 tokenizer does: split on added tokens, sentencepiece-encode the rest, BOS first."""
    sp, added, pattern = _sentencepiece(folder)
    ids = [1]
    for part in pattern.split(text):
        if part:
            ids += [added[part]] if part in added else sp.encode(part)
    return ids


@needs_fixtures
def test_internlm2_tokenizer_matches_sentencepiece():
    import random

    folder = FIXTURES / "InternVL2-2B"
    tok = load_original_tokenizer(folder)
    assert len(tok) == 92553
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == 92546
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<img>", "</img>"]) == [92543, 92542, 92544, 92545]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    for text in TEXTS:
        assert tok(text)["input_ids"] == sentencepiece_reference(folder, text), text
    rng = random.Random(0)
    alphabet = list("abcXYZ 019\n\t.,!?'你好世界测试😀éü") + ["<|im_end|>", "<img>", "  "]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        assert tok(text)["input_ids"] == sentencepiece_reference(folder, text), text
    ids = tok("Hello 你好\n  x<|im_end|>")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "Hello 你好\n  x"
    assert tok.chat_template.startswith("{{ bos_token }}")


@needs_fixtures
@pytest.mark.parametrize("name,img_context", [("InternVL2-1B", 151648), ("InternVL2_5-1B-MPO", 151667)])
def test_qwen2_tokenizers_load_without_remote_code(name, img_context):
    tok = load_original_tokenizer(FIXTURES / name)  # InternVL2_5-1B-MPO files have CRLF line ends
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == img_context
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert tok.eos_token == "<|im_end|>"


def test_remote_only_tokenizer_is_refused(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "InternLM3Tokenizer"}))
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json.*InternLM3Tokenizer"):
        load_original_tokenizer(tmp_path)


# --------------------------------------------------------------------------------------------------
# PEFT adapters
# --------------------------------------------------------------------------------------------------


def _lora_adapter(model, tmp_path: Path, targets: str, r: int = 4, alpha: int = 8, seed: int = 3) -> Path:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    out = tmp_path / "adapter_hf"
    peft_model.save_pretrained(out)
    return out


def _merged_original(adapter: Path, base_original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply an original-layout adapter by hand: W += scale * B @ A, scale from r/alpha and the patterns."""
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    merged = {k: v.clone() for k, v in base_original.items()}
    for key, a in weights.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        b = weights[key.replace("lora_A", "lora_B")]
        r = pattern_value(acfg["rank_pattern"], module, acfg["r"])
        alpha = pattern_value(acfg["alpha_pattern"], module, acfg["lora_alpha"])
        assert r == a.shape[0]
        merged[module + ".weight"] += (alpha / r) * (b.double() @ a.double()).float()
    return merged


@needs_fixtures
@pytest.mark.parametrize("name", ["internlm2-InternVL2-2B", "qwen2-InternVL3-2B"])
def test_adapter_native_to_original_and_back_is_exact(tmp_path, name):
    from peft import PeftModel

    cfg = tiny_configs()[name]
    base = random_native(cfg)
    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    hf_adapter = _lora_adapter(base, tmp_path, targets)
    merged_native = PeftModel.from_pretrained(copy.deepcopy(base), hf_adapter).merge_and_unload().state_dict()

    orig_adapter = convert_adapter(hf_adapter, tmp_path / "adapter_orig", to="original", cfg=cfg)
    acfg = json.loads((orig_adapter / "adapter_config.json").read_text())
    keys = load_file(str(orig_adapter / "adapter_model.safetensors")).keys()
    if name.startswith("internlm2"):
        assert "base_model.model.language_model.model.layers.0.attention.wqkv.lora_A.weight" in keys
        assert "language_model.model.layers.1.feed_forward.w2" in acfg["target_modules"]
        assert set(acfg["rank_pattern"].values()) == {12}  # independent q/k/v LoRAs: rank 3r, exact
    else:
        assert "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
        assert acfg["rank_pattern"] == {} and acfg["alpha_pattern"] == {}
    # the original-layout adapter, applied by hand, gives the natively merged weights
    base_original = hf_to_original_state_dict(base.state_dict(), cfg)
    expected = hf_to_original_state_dict(merged_native, cfg)
    got = _merged_original(orig_adapter, base_original)
    for k in expected:
        assert torch.allclose(got[k], expected[k], atol=1e-5), k

    # and back to the native layout: loads with PEFT and merges to the same weights
    back = convert_adapter(orig_adapter, tmp_path / "adapter_back", to="hf", cfg=cfg)
    merged_back = PeftModel.from_pretrained(copy.deepcopy(base), back).merge_and_unload().state_dict()
    for k, v in merged_native.items():
        assert torch.allclose(merged_back[k], v, atol=1e-5), k


@needs_fixtures
def test_adapter_fuse_keeps_rank_when_the_q_k_v_lora_came_from_a_split(tmp_path):
    cfg = tiny_configs()["internlm2-InternVL2-2B"]
    base = random_native(cfg)
    hf_adapter = _lora_adapter(base, tmp_path, r".*language_model.*\.(q_proj|k_proj|v_proj)")
    orig = convert_adapter(hf_adapter, tmp_path / "o1", to="original", cfg=cfg)
    split = convert_adapter(orig, tmp_path / "h1", to="hf", cfg=cfg)  # same A for q, k, v now
    refused = convert_adapter(split, tmp_path / "o2", to="original", cfg=cfg)
    a1, a2 = load_file(str(orig / "adapter_model.safetensors")), load_file(str(refused / "adapter_model.safetensors"))
    key = "base_model.model.language_model.model.layers.0.attention.wqkv.lora_A.weight"
    assert a1[key].shape[0] == 12
    # a split fused adapter has one shared A (rank 12 here) and fuses back without growing
    assert a2[key].shape[0] == 12 and torch.equal(a1[key], a2[key])


def test_adapter_dora_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True, "r": 4}))
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    cfg = {"model_type": "internvl_chat", "llm_config": {"architectures": ["Qwen2ForCausalLM"]}}
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: use_dora=True.*merge"):
        convert_adapter(tmp_path, tmp_path / "out", to="original", cfg=cfg)


@needs_fixtures
def test_adapter_with_partial_qkv_embedding_lora_and_saved_modules(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = tiny_configs()["internlm2-InternVL2_5-8B"]
    base = random_native(cfg)
    lora_cfg = LoraConfig(r=2, lora_alpha=6, target_modules=r".*language_model.*\.(q_proj|v_proj|embed_tokens)",
                          modules_to_save=["lm_head"])
    peft_model = get_peft_model(copy.deepcopy(base), lora_cfg)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(tmp_path / "a")
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()

    orig = convert_adapter(tmp_path / "a", tmp_path / "o", to="original", cfg=cfg)
    acfg = json.loads((orig / "adapter_config.json").read_text())
    assert acfg["modules_to_save"] == ["language_model.output"]
    assert "language_model.model.tok_embeddings" in acfg["target_modules"]
    keys = load_file(str(orig / "adapter_model.safetensors")).keys()
    assert "base_model.model.language_model.output.weight" in keys
    assert "base_model.model.language_model.model.tok_embeddings.lora_embedding_A" in keys
    wqkv_a = "base_model.model.language_model.model.layers.0.attention.wqkv.lora_A.weight"
    assert load_file(str(orig / "adapter_model.safetensors"))[wqkv_a].shape[0] == 4  # q and v: 2 + 2

    back = convert_adapter(orig, tmp_path / "h", to="hf", cfg=cfg)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), back).merge_and_unload().state_dict()
    for k, v in merged.items():
        assert torch.allclose(reloaded[k], v, atol=1e-5), k


@needs_fixtures
def test_checkpoint_module_reads_original_folders(tmp_path):
    from internvl_lora.internvl import checkpoint

    cfg = tiny_configs()["internlm2-InternVL2-2B"]
    native = random_native(cfg)
    folder = write_original(tmp_path / "ckpt", cfg, native, extras=False)
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        shutil.copy(FIXTURES / "InternVL2-2B" / f, folder / f)
    info = checkpoint.inspect_checkpoint(folder)
    assert (info.format, info.llm_type, info.template) == ("original", "llama", "internlm2-chat")
    assert info.tokens_per_tile == 4
    tok = checkpoint.load_tokenizer(folder)
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == 92546
    model = checkpoint.load_model(folder)
    assert model.config.image_token_id == 92546
    assert all(torch.equal(model.state_dict()[k], v) for k, v in native.state_dict().items())


@needs_fixtures
def test_adapter_layout_from_an_hf_config_folder(tmp_path):
    cfg = tiny_configs()["qwen2-InternVL3-2B"]
    base = random_native(cfg)
    base.config.image_token_id = IMAGE_TOKEN
    base.save_pretrained(tmp_path / "hf")
    adapter = _lora_adapter(base, tmp_path, r".*language_model.*\.(q_proj|o_proj)")
    out = convert_adapter(adapter, tmp_path / "o", to="original", cfg=tmp_path / "hf")
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert "base_model.model.language_model.model.layers.1.self_attn.o_proj.lora_B.weight" in keys
    with pytest.raises(CheckpointError, match="needs the model's config"):
        convert_adapter(adapter, tmp_path / "o2", to="original", cfg=None)
