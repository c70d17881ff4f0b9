"""The config system and every shipped config (configs/**/*.yaml, configs/deepspeed/*.json)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from internvl_lora.config import RunConfig, load_config, reference, save_config
from internvl_lora.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RUN_CONFIGS = sorted(CONFIGS.glob("**/*.yaml"))


def test_configs_are_shipped():
    names = {p.relative_to(CONFIGS).as_posix() for p in RUN_CONFIGS}
    assert len(RUN_CONFIGS) >= 5, names
    for required in ("seed_recipe.yaml", "internvl3-8b-lora.yaml", "internvl3-1b-hf-lora.yaml", "vision-lora.yaml",
                     "fsdp.yaml"):
        assert required in names
    assert sorted(p.name for p in (CONFIGS / "deepspeed").glob("*.json")) == ["zero1.json", "zero2.json", "zero3.json"]


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_shipped_config_parses(path):
    # Model and data paths are placeholders for a local download: structure and values are checked, not files.
    cfg = load_config(path, check=False)
    assert cfg.model.path and cfg.data.meta
    assert cfg.train.output_dir.startswith("runs/")
    if cfg.train.deepspeed:  # resolved next to the config file, and that file exists
        assert Path(cfg.train.deepspeed).is_file(), cfg.train.deepspeed
    # With real files in place the full check passes too (only the placeholders are missing).
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert all("does not exist" in p or _missing_liger(cfg, p) for p in e.value.problems), e.value.problems
    assert any(p.startswith("model.path") for p in e.value.problems)


def _missing_liger(cfg, problem: str) -> bool:
    """The environment check of a GPU config (train.liger) on a machine without liger-kernel."""
    import importlib.util

    return cfg.train.liger and importlib.util.find_spec("liger_kernel") is None and problem.startswith("train.liger")


def test_every_shipped_config_passes_the_full_check_with_real_paths(tmp_path):
    model, meta = tmp_path / "model", tmp_path / "meta.json"
    model.mkdir()
    meta.write_text("{}")
    for path in RUN_CONFIGS:
        try:
            cfg = load_config(path, [f"model.path={model}", f"data.meta={meta}"])
        except ConfigError as e:  # only a GPU config's liger check may fail here, on a machine without it
            cfg = load_config(path, check=False)
            assert all(_missing_liger(cfg, p) for p in e.problems), e.problems
            continue
        assert cfg.model.path == str(model)


def test_seed_recipe_is_the_official_lora_recipe():
    cfg = load_config(CONFIGS / "seed_recipe.yaml", check=False)
    p, t, d = cfg.policy, cfg.train, cfg.data
    assert (p.vision, p.projector, p.llm) == ("frozen", "frozen", "lora")
    assert (p.r, p.alpha, p.dropout, p.init, p.use_dora, p.use_rslora) == (16, 32, 0.05, "default", False, False)
    assert (t.per_device_batch_size, t.grad_accum) == (4, 2)  # x 2 GPUs = 16
    assert (t.lr, t.lr_scheduler, t.warmup_ratio, t.weight_decay) == (4e-5, "cosine", 0.03, 0.05)
    assert cfg.model.dtype == "bfloat16" and t.gradient_checkpointing
    assert (d.max_length, d.max_dynamic_patch) == (8192, 6)
    assert Path(t.deepspeed) == CONFIGS / "deepspeed" / "zero1.json"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_configs_defer_to_the_training_arguments(stage):
    ds = json.loads((CONFIGS / "deepspeed" / f"zero{stage}.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert ds[key] == "auto", key
    assert ds["bf16"]["enabled"] == "auto" and ds["fp16"]["enabled"] == "auto"
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["lr"] == "auto" and ds["optimizer"]["params"]["weight_decay"] == "auto"
    assert "scheduler" not in ds  # the HF cosine schedule with warmup, as in the official scripts
    for v in ds["zero_optimization"].values():
        assert not isinstance(v, float), "bucket sizes must be integers"
    if stage == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_fsdp_config_is_passed_to_the_trainer(tmp_path):
    from internvl_lora.train.trainer import training_arguments

    cfg = load_config(CONFIGS / "fsdp.yaml", check=False)
    assert cfg.train.fsdp and isinstance(cfg.train.fsdp_config, dict)
    assert cfg.train.fsdp_config["version"] == 2 and cfg.train.gradient_checkpointing
    assert cfg.train.fsdp_config["activation_checkpointing"] is False  # PEFT would save empty adapters
    assert cfg.train.deepspeed is None
    # a JSON path works as well as an inline mapping
    path = tmp_path / "fsdp.json"
    path.write_text(json.dumps(cfg.train.fsdp_config))
    cfg2 = load_config(CONFIGS / "fsdp.yaml", [f"train.fsdp_config={path}"], check=False)
    assert cfg2.train.fsdp_config == str(path)
    import torch

    cfg2.train.output_dir = str(tmp_path / "run")
    args = training_arguments(cfg2, tmp_path / "run", torch.float32, has_eval=False)
    assert args.fsdp_config["version"] == 2


def test_unknown_keys_get_a_suggestion_and_all_problems_are_reported(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": "x", "dtpye": "float32"},
        "data": {"meta": "m.json", "max_lenght": 10},
        "policy": {"r": "many", "vision": "sometimes"},
        "train": {"lr": -1, "learning_rate": 1e-4},
        "trainer": {},
    }))
    with pytest.raises(ConfigError) as e:
        load_config(path, check=False)
    text = str(e.value)
    assert "model.dtpye (did you mean model.dtype?)" in text
    assert "data.max_lenght (did you mean data.max_length?)" in text
    assert "unknown key trainer" in text
    assert "policy.r: 'many' is not of type int" in text
    assert "policy.vision must be one of frozen, lora, full" in text
    assert "train.lr must be > 0" in text
    assert len(e.value.problems) >= 7


def test_overrides_and_yaml_scalars(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "x"}, "data": {"meta": "m"}}))
    cfg = load_config(path, ["train.lr=4e-5", "policy.llm_targets=[self_attn.q_proj, mlp.up_proj]",
                             "train.report_to=[]", "train.resume=true", "data.eval_fraction=0.1",
                             "train.eval_steps=5"], check=False)
    assert cfg.train.lr == 4e-5 and isinstance(cfg.train.lr, float)
    assert cfg.policy.llm_targets == ["self_attn.q_proj", "mlp.up_proj"]
    assert cfg.train.report_to == [] and cfg.train.resume is True
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(path, ["train.lr"], check=False)


@pytest.mark.parametrize("overrides, message", [
    (["data.eval_fraction=0.1", "data.eval_meta=x.jsonl"], "not both"),
    (["train.eval_steps=10"], "need held-out data"),
    (["train.generate_steps=10"], "need held-out data"),
    (["data.eval_fraction=1.5"], "data.eval_fraction must be in [0, 1)"),
    (["policy.llm=frozen", "policy.vision=frozen", "policy.projector=frozen"], "every part is frozen"),
    (["policy.llm=full", "policy.llm_targets=[mlp.up_proj]"], "policy.llm_targets is set"),
    (["policy.init=loftq"], "policy.init must be one of"),
    (["train.dummy_vision=sometimes"], "train.dummy_vision must be one of"),
    (["train.fsdp=true", "train.deepspeed=zero1.json"], "exclusive"),
    (["train.fsdp=true", "train.fsdp_config={version: 2, activation_checkpointing: true}"],
     "activation_checkpointing: true cannot be used with LoRA"),
    (["policy.projector=lora"], "policy.projector must be one of frozen, full"),
    (["data.max_tokens_per_batch=-1"], "data.max_tokens_per_batch must be >= 0"),
    (["data.max_tokens_per_batch=4096", "data.max_length=8192"],
     "data.max_tokens_per_batch (4096) must be >= data.max_length (8192)"),
    (["train.checkpoint_layers=1.5"], "train.checkpoint_layers must be auto or a number in [0, 1]"),
    (["train.checkpoint_layers=most"], "train.checkpoint_layers must be auto or a number in [0, 1], got 'most'"),
    (["train.loss_reduction=mean"], "train.loss_reduction must be one of token, sample, square"),
    (["train.compile=true"], "train.compile was removed"),
    (["train.objective=dpo"], "train.objective must be sft or mpo"),
    (["train.objective=mpo", "policy.init=pissa"], "does not work with policy.init=pissa"),
    (["train.objective=mpo", "policy.llm=full"], "needs LoRA on the LLM or the vision tower"),
    (["preference.sigmoid_weight=0", "preference.bco_pair_weight=0", "preference.sft_weight=0"],
     "all three loss weights are 0"),
    (["preference.beta=0"], "preference.beta must be a positive number"),
    (["preference.sft_weight=-1"], "preference.sft_weight must be >= 0"),
    (["train.objective=mpo", "train.loss_reduction=sample"], "leave train.loss_reduction=token"),
])
def test_semantic_checks(tmp_path, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "x"}, "data": {"meta": "m"}}))
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides, check=False)
    assert message in str(e.value)


def test_missing_files_are_reported_with_the_fix(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "nowhere/InternVL3-1B-hf"}, "data": {"meta": "nowhere.json"}}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "model.path nowhere/InternVL3-1B-hf does not exist" in str(e.value)
    assert "huggingface-cli download" in str(e.value)
    assert "data.meta nowhere.json does not exist" in str(e.value)


def test_saved_config_loads_back_identical(tmp_path):
    cfg = load_config(CONFIGS / "fsdp.yaml", ["policy.vision=lora", "train.lr=1e-4"], check=False)
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml", check=False)
    expected = dataclasses.asdict(cfg)
    for section, key in (("model", "path"), ("data", "meta"), ("train", "output_dir")):  # saved absolute
        if expected[section][key]:
            expected[section][key] = str(Path(expected[section][key]).resolve())
    assert dataclasses.asdict(again) == expected


def test_reference_documents_every_field_and_docs_list_them():
    text = reference()
    docs = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    defaults = RunConfig()
    for section in dataclasses.fields(RunConfig):
        for f in dataclasses.fields(getattr(defaults, section.name)):
            key = f"`{section.name}.{f.name}`"
            assert key in text, key
            assert key in docs, f"{key} is missing from docs/training.md (regenerate the reference table)"
    # every row has a meaning
    for line in text.splitlines():
        if line.startswith("| `"):
            assert not line.rstrip().endswith("|  |"), line


def test_liger_without_the_package_is_reported_before_training(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    (tmp_path / "model").mkdir()
    (tmp_path / "meta.json").write_text("{}")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": str(tmp_path / "model")}, "data": {"meta": str(tmp_path / "meta.json")}}))
    assert load_config(path, ["train.liger=true"], check=False).train.liger  # parsing alone does not look
    with pytest.raises(ConfigError, match="train.liger needs the liger-kernel package"):
        load_config(path, ["train.liger=true"])
