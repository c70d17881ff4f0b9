"""Per-part policy (vision / projector / LLM: frozen | lora | full) on the tiny InternVL, LoRA options,
and the guarantee that training never changes a frozen base weight."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from internvl_lora.config import PolicyArgs, load_config
from internvl_lora.internvl.lora_targets import LLM_TARGETS, VISION_TARGETS, part_of
from internvl_lora.lora.policy import apply_policy, format_table, lora_config, trainable_table

VISION_LAYERS, LLM_LAYERS = 2, 3  # the tiny model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one intra-op thread per process is much faster
    yield
    torch.set_num_threads(n)


def fresh_model(demo):
    from internvl_lora.internvl.checkpoint import load_model

    return load_model(demo.parent / "model", dtype=torch.float32)


COMBOS = [c for c in itertools.product(("frozen", "lora", "full"), ("frozen", "full"), ("frozen", "lora", "full"))
          if c != ("frozen", "frozen", "frozen")]


def expected_trainable(name: str, policy: PolicyArgs, wrapped: bool) -> bool:
    part = part_of(name)
    mode = getattr(policy, part)
    if "lora_" in name:
        assert mode == "lora", f"{name}: LoRA on a part set to {mode}"
        return True
    if ".modules_to_save." in name:
        assert mode == "full", name
        return True
    if ".original_module." in name:
        return False
    return mode == "full" and not wrapped  # with PEFT, full parts train through their modules_to_save copy


@pytest.mark.parametrize("vision, projector, llm", COMBOS)
def test_policy_gives_the_expected_trainable_set(demo, vision, projector, llm):
    policy = PolicyArgs(vision=vision, projector=projector, llm=llm, r=4)
    model = apply_policy(fresh_model(demo), policy, "qwen2")
    wrapped = hasattr(model, "peft_config")
    assert wrapped == ("lora" in (vision, llm))
    lora_modules = {part: set() for part in ("vision", "projector", "llm")}
    for name, p in model.named_parameters():
        assert p.requires_grad == expected_trainable(name, policy, wrapped), name
        m = re.match(r"(.*)\.lora_A\.default\.weight$", name)
        if m:
            lora_modules[part_of(name)].add(m.group(1))
    # every default target of every layer, nothing else
    assert len(lora_modules["llm"]) == (LLM_LAYERS * len(LLM_TARGETS["qwen2"]) if llm == "lora" else 0)
    assert len(lora_modules["vision"]) == (VISION_LAYERS * len(VISION_TARGETS) if vision == "lora" else 0)
    assert not lora_modules["projector"]
    table = trainable_table(model, policy)
    for part in ("vision", "projector", "llm"):
        n = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and part_of(name) == part)
        assert table["parts"][part]["trainable"] == n
        assert (n > 0) == (getattr(policy, part) != "frozen")
        assert table["parts"][part]["policy"] == getattr(policy, part)
    assert table["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    base_total = sum(p.numel() for p in fresh_model(demo).parameters())
    assert table["total"] == base_total  # adapter copies are not counted as base parameters
    text = format_table(table, policy)
    assert f"trainable {table['trainable']:,} of {base_total:,} parameters" in text


def test_full_projector_is_saved_with_the_adapter_and_reloads_identically(demo, tmp_path):
    from peft import PeftModel

    policy = PolicyArgs(vision="lora", projector="full", llm="lora", r=4)
    model = apply_policy(fresh_model(demo), policy, "qwen2")
    with torch.no_grad():  # pretend training moved everything that trains
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "adapter")
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert any("multi_modal_projector.linear_1.weight" in k for k in keys)
    assert any("vision_tower" in k and "lora_A" in k for k in keys)
    assert any("language_model" in k and "lora_B" in k for k in keys)
    assert not any("embed_tokens" in k or "lm_head" in k for k in keys)  # adapter only
    reloaded = PeftModel.from_pretrained(fresh_model(demo), tmp_path / "adapter")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        model.eval()
        a = model(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
        pixels = torch.randn(1, 3, 64, 64)
        fa = model.get_base_model().model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                                             vision_feature_select_strategy="default").pooler_output
        fb = reloaded.get_base_model().model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                                                vision_feature_select_strategy="default").pooler_output
    assert torch.equal(a, b) and torch.equal(fa, fb)


def test_lora_options_reach_peft():
    c = lora_config(PolicyArgs(r=8, alpha=None, dropout=0.1, use_dora=True, use_rslora=True, init="pissa"), "qwen2")
    assert (c.r, c.lora_alpha, c.lora_dropout, c.use_dora, c.use_rslora, c.init_lora_weights) == \
        (8, 16, 0.1, True, True, "pissa")
    assert lora_config(PolicyArgs(init="olora"), "qwen2").init_lora_weights == "olora"
    assert lora_config(PolicyArgs(init="default"), "qwen2").init_lora_weights is True
    # default targets per LLM architecture, anchored on the LLM layers (never the vision tower)
    phi = lora_config(PolicyArgs(), "phi3").target_modules
    assert "qkv_proj" in phi and "gate_up_proj" in phi and "vision_tower" not in phi
    custom = lora_config(PolicyArgs(llm_targets=["mlp.down_proj"]), "qwen2").target_modules
    assert "down_proj" in custom and "q_proj" not in custom
    assert lora_config(PolicyArgs(llm="full", projector="full"), "qwen2") is None
    both = lora_config(PolicyArgs(vision="lora", projector="full"), "qwen2")
    assert both.modules_to_save == ["multi_modal_projector"]
    assert re.fullmatch(both.target_modules, "model.vision_tower.encoder.layer.1.mlp.fc2")
    assert re.fullmatch(both.target_modules, "model.language_model.layers.2.self_attn.o_proj")
    assert not re.fullmatch(both.target_modules, "model.multi_modal_projector.linear_1")


@pytest.mark.parametrize("option", ["use_dora", "use_rslora"])
def test_dora_and_rslora_train(demo, option):
    policy = PolicyArgs(r=4, **{option: True})
    model = apply_policy(fresh_model(demo), policy, "qwen2")
    if option == "use_dora":
        assert any("lora_magnitude_vector" in n and p.requires_grad for n, p in model.named_parameters())
    else:
        layer = model.get_base_model().model.language_model.layers[0].self_attn.q_proj
        assert layer.scaling["default"] == pytest.approx(8 / 4 ** 0.5)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _capture_models(monkeypatch) -> list:
    import internvl_lora.train as train_mod

    captured = []
    real = train_mod.apply_policy

    def spy(model, policy, llm_type):
        out = real(model, policy, llm_type)
        captured.append(out)
        return out

    monkeypatch.setattr(train_mod, "apply_policy", spy)
    return captured


def test_training_never_changes_a_frozen_base_weight(demo, tmp_path, monkeypatch, capsys):
    from internvl_lora.train import train

    captured = _capture_models(monkeypatch)
    before = {k: v.clone() for k, v in fresh_model(demo).state_dict().items()}
    cfg = load_config(demo, [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3", "train.logging_steps=1",
                             "train.report_to=[]", "train.weight_decay=0.1", "train.lr=1e-2", "train.warmup_ratio=0",
                             "policy.vision=lora", "policy.projector=full", "policy.r=4"])
    adapter = train(cfg)
    model = captured[0]
    trained = {}
    for name, p in model.named_parameters():
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if "lora_" in name or ".modules_to_save." in name:
            trained[name] = p
            continue
        key = key.replace(".original_module", "")
        assert torch.equal(p.detach(), before[key]), f"frozen base weight {key} changed"
    # ... while every trained tensor moved
    assert all(float(p.detach().abs().max()) > 0 for n, p in trained.items() if "lora_B" in n)
    proj = [p for n, p in trained.items() if "multi_modal_projector" in n and n.endswith("linear_1.weight")]
    assert proj and not torch.equal(proj[0].detach(), before["model.multi_modal_projector.linear_1.weight"])
    # the trainable-parameter table is printed and saved
    out = capsys.readouterr().out
    assert re.search(r"trainable [\d,]+ of [\d,]+ parameters \(\d+\.\d+ %\)", out)
    table = json.loads((tmp_path / "run" / "trainable_params.json").read_text())
    assert table["parts"]["vision"]["policy"] == "lora" and table["parts"]["projector"]["trainable"] > 0
    assert json.loads((adapter / "internvl_lora.json").read_text())["trainable"] == table
    assert 0 < table["share"] < 1


def test_pissa_adapter_is_converted_to_apply_on_the_original_base(demo, tmp_path, monkeypatch):
    from peft import PeftModel

    from internvl_lora.train import train

    captured = _capture_models(monkeypatch)
    cfg = load_config(demo, [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.report_to=[]",
                             "policy.init=pissa", "policy.r=4", "policy.dropout=0", "train.lr=1e-2",
                             "train.warmup_ratio=0"])
    adapter = train(cfg)
    trained = captured[0].eval()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8  # rank 2r after conversion
    original = fresh_model(demo)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        base_logits = original(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(original, adapter).eval()
        a, b = trained(input_ids=ids).logits, reloaded(input_ids=ids).logits
    assert float((a - b).abs().max()) < 1e-4  # the converted adapter on the untouched base = the trained model
    assert float((a - base_logits).abs().max()) > 1e-3  # and training changed something
