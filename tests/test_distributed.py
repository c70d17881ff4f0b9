"""Distributed training on CPU (gloo): 2-process DDP through `torchrun` gives the same loss curve as one
process with the same global batch, including steps where one rank holds only a text-only sample
and a vision LoRA (the blank-tile vision pass keeps every rank running the same modules).

Why the two runs are mathematically equal: the HF Trainer divides the summed token losses of a step
by the number of trained tokens of the whole global batch (`num_items_in_batch`, gathered over ranks
with `average_tokens_across_devices`, the default) and multiplies each rank's loss by the world size,
which DDP's gradient averaging divides out again. So 2 ranks x batch B and 1 rank x batch 2B optimise
the same token-weighted mean, provided both see the same samples in each step: `GroupedSampler`
shuffles by (seed, epoch) over the *global* batch, and accelerate gives rank r the r-th per-device
slice. LoRA dropout is 0 (its masks would come from per-rank RNG streams). The one-process run sets
`train.dummy_vision=always`, which DDP does by default: on a step where a rank holds only text, its
vision parameters then get a zero gradient instead of none, and Adam still moves them by momentum (a
real difference of ~1e-2 in the next loss without it, so the test can tell).

Tolerance: the runs differ only in float32 rounding (another summation order in the gradient
all-reduce, other padding lengths hence other matmul blockings), ~1e-7 relative per operation.
Logged losses: relative 1e-5 (measured ~2e-7). Adapter weights after 9 Adam steps: absolute 1e-4.
Adam moves every weight by about lr (3e-3) per step whatever the gradient's scale, so a different
batch or loss normalisation shows up as differences of order 1e-3; rounding noise, amplified where
Adam divides by a tiny second moment, stays far below (measured: 3e-6).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from internvl_lora.run_dir import read_metrics
from internvl_lora.train.callbacks import StepStats
from internvl_lora.config import PolicyArgs, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TEXT_ONLY = [("Which colour comes first: red or blue?", "red"), ("Name a warm colour.", "yellow")]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def demo(demo_folder, tmp_path_factory):
    """16 image samples + 2 text-only ones (18: an even split over 2 ranks)."""
    cfg = demo_folder(16, 4, copy_to=tmp_path_factory.mktemp("demo")) / "train.yaml"
    train = cfg.parent / "data" / "train.jsonl"
    lines = [json.loads(x) for x in train.read_text().splitlines()]
    lines = [x for x in lines if "image" in x]  # keep the text-only samples under control
    lines = lines[:16] + [{"id": 900 + k, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
                          for k, (q, a) in enumerate(TEXT_ONLY)]
    train.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return cfg


def overrides(out, batch):
    return [f"train.output_dir={out}", "train.report_to=[]", "train.logging_steps=1", "train.save_steps=1000",
            f"train.per_device_batch_size={batch}", "train.grad_accum=1", "train.epochs=1", "policy.dropout=0",
            "policy.vision=lora", "policy.r=8", "train.watchdog=true"]


@pytest.fixture(scope="module")
def single(demo, tmp_path_factory):
    """The reference: one process, per-device batch 2 (= the global batch of 2 ranks x 1).

    Step 8 holds the two text-only samples: under DDP each rank runs the blank tile and the vision LoRA
    gets a zero gradient (Adam still applies its momentum); one process must do the same to match."""
    from internvl_lora.train import train

    out = tmp_path_factory.mktemp("single") / "run"
    train(load_config(demo, overrides(out, 2) + ["train.dummy_vision=always"]))
    return out


def launch(demo, out, nproc, *extra, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    batch = 2 // nproc
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         "-m", "internvl_lora.cli", "train", str(demo), *overrides(out, batch), *extra],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def assert_same_run(out, ref, weight_tol=1e-4):
    got = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    want = [r for r in read_metrics(ref / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 10))  # 18 samples / batch 2
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
        assert a["trained_tokens"] == b["trained_tokens"]  # counted over every rank
    assert got[-1]["loss"] < got[0]["loss"]
    wa = load_file(out / "adapter" / "adapter_model.safetensors")
    wb = load_file(ref / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and any("vision_tower" in k for k in wa)
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert diff < weight_tol, diff
    assert max(float(wa[k].abs().max()) for k in wa if "lora_B" in k) > 1e-3  # it trained


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(demo, single, tmp_path):
    launch(demo, tmp_path / "ddp", 2)
    meta = json.loads((tmp_path / "ddp" / "internvl_lora.json").read_text())
    assert meta["versions"]["world_size"] == 2
    assert_same_run(tmp_path / "ddp", single)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_deepspeed_zero_single_process_on_cpu(demo, single, tmp_path, stage):
    """Only where DeepSpeed is installed (not a dependency): the shipped ZeRO JSON with torch's AdamW
    (DeepSpeed's fused one needs CUDA). ZeRO-3 partitions every weight: the blank-tile vision pass
    and the watchdog's LoRA check run on partitioned parameters."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed")
    ds = json.loads((CONFIGS / "deepspeed" / f"zero{stage}.json").read_text())
    ds["optimizer"]["params"]["torch_adam"] = True
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(ds))
    out = tmp_path / f"zero{stage}"
    launch(demo, out, 1, f"train.deepspeed={path}", "train.dummy_vision=always", "train.watchdog_lora_steps=2")
    assert list((out / "checkpoint-9").glob("global_step9"))  # DeepSpeed's own optimizer state
    assert not list((out / "checkpoint-9").glob("model*.safetensors"))
    assert_same_run(out, single, weight_tol=1e-3)


# ---------------------------------------------------------------------------------------------------
# The blank-tile vision pass (what keeps ZeRO-3 / FSDP / DDP ranks in step on text-only batches)


def _setup(demo, tmp_path, policy: PolicyArgs):
    from transformers import TrainingArguments

    from internvl_lora.internvl.checkpoint import inspect_checkpoint, load_model, load_tokenizer
    from internvl_lora.lora.policy import apply_policy
    from internvl_lora.train import encode_settings
    from internvl_lora.train.trainer import InternVLTrainer

    torch.manual_seed(0)
    model = apply_policy(load_model(demo.parent / "model", dtype=torch.float32), policy, "qwen2")
    with torch.no_grad():  # non-zero B, so that the vision LoRA A matrices could get a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = InternVLTrainer(model=model, args=args, stats=StepStats())
    cfg = load_config(demo)
    settings = encode_settings(cfg, inspect_checkpoint(cfg.model.path))
    return trainer, model, load_tokenizer(cfg.model.path), settings


def _text_items(tok, n=2):
    items = []
    for k in range(n):
        ids = tok(f"<|im_start|>user\nSay {'hello ' * (k + 1)}.<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>")[
            "input_ids"]
        labels = [-100] * (len(ids) - 3) + ids[-3:]
        items.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
    return items


def _grads(model, part):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad and part in n}


def test_blank_tile_keeps_the_loss_and_gives_vision_params_zero_gradients(demo, tmp_path):
    from internvl_lora.data.collate import data_collator

    policy = PolicyArgs(vision="lora", projector="full", llm="lora", r=4, dropout=0.0)
    trainer, model, tok, settings = _setup(demo, tmp_path, policy)
    model.train()
    items = _text_items(tok)
    plain = data_collator(tok, settings, dummy_vision=False)(items)
    blank = data_collator(tok, settings, dummy_vision=True)(items)
    assert "pixel_values" not in plain and blank["pixel_values"].shape[0] == 1
    loss_plain = trainer.compute_loss(model, plain)
    loss_plain.backward()
    without = {k: {n: (g.clone() if g is not None else None) for n, g in _grads(model, k).items()}
               for k in ("vision_tower", "multi_modal_projector", "language_model")}
    model.zero_grad(set_to_none=True)
    loss_blank = trainer.compute_loss(model, blank)
    loss_blank.backward()
    # the loss is unchanged (only float rounding: the padded length differs)
    assert float(loss_blank.detach()) == pytest.approx(float(loss_plain.detach()), abs=1e-6)
    # without the tile the vision parameters sit the step out; with it they take part, with a zero gradient
    for part in ("vision_tower", "multi_modal_projector"):
        assert without[part] and all(g is None for g in without[part].values())
        assert all(g is not None and not g.abs().max() for g in _grads(model, part).values()), part
    # and the LLM gradients are the same
    for n, g in _grads(model, "language_model").items():
        assert torch.allclose(g, without["language_model"][n], atol=1e-6), n


def test_blank_tile_is_one_tile_and_only_for_text_only_batches(demo, tmp_path):
    from internvl_lora.data.collate import PadCollator
    from internvl_lora.data.collate import data_collator

    _, model, tok, settings = _setup(demo, tmp_path, PolicyArgs(vision="lora", r=4))
    assert isinstance(data_collator(tok, settings, dummy_vision=False), PadCollator)
    collate = data_collator(tok, settings, dummy_vision=True)
    items = _text_items(tok)
    blank = collate(items)
    image_id = model.config.image_token_id
    assert blank["pixel_values"].shape == (1, 3, settings.tile_size, settings.tile_size)  # one tile: cheap
    assert int((blank["input_ids"] == image_id).sum()) == settings.tokens_per_tile
    assert not bool(blank["attention_mask"][blank["input_ids"] == image_id].any())  # masked out
    assert not bool((blank["labels"][blank["input_ids"] == image_id] != -100).any())  # carries no loss
    with_image = items + [{"input_ids": torch.tensor([image_id] * settings.tokens_per_tile + [1, 2]),
                           "labels": torch.tensor([-100] * settings.tokens_per_tile + [1, 2]),
                           "pixel_values": torch.ones(1, 3, settings.tile_size, settings.tile_size)}]
    batch = collate(with_image)
    plain = PadCollator(tok.pad_token_id)(with_image)
    assert all(torch.equal(batch[k], plain[k]) for k in plain)  # batches with images are untouched


def test_grouped_sampler_depends_only_on_seed_epoch_and_global_batch():
    from internvl_lora.train.trainer import GroupedSampler

    lengths = [(k * 37) % 101 for k in range(40)]
    a = GroupedSampler(lengths, global_batch=8, seed=3)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(123)  # the global RNG plays no part
    assert list(a) == first
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(40))
    b = GroupedSampler(lengths, global_batch=8, seed=3)
    assert list(b) == first
    # each global batch of 8 is grouped by length: 1 process x 8 and 2 processes x 4 see the same samples
    chunks = [first[i:i + 8] for i in range(0, 40, 8)]
    assert sum(len(c) for c in chunks) == 40


@pytest.fixture(scope="module")
def mpo(demo, tmp_path_factory):
    """(overrides of a preference run, its one-process reference run: per-device batch 2, no sharding)."""
    from internvl_lora.data.synthetic import make_preference_dataset
    from internvl_lora.train import train

    root = tmp_path_factory.mktemp("mpo")
    data = make_preference_dataset(root / "pairs", n_train=12, n_heldout=2)
    extra = ["train.objective=mpo", f"data.meta={data / 'meta.json'}"]
    single = root / "single"
    train(load_config(demo, overrides(single, 2) + extra + ["train.dummy_vision=always"]))
    return extra, single


def assert_same_preference_run(out, ref, rel=1e-4, weight_tol=1e-4):
    got = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    want = [r for r in read_metrics(ref / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))  # 12 pairs / 2
    for a, b in zip(got, want):
        for key in ("loss", "bco_delta", "rewards/margin", "loss/sft"):
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-6), (key, a, b)
    wa = load_file(out / "adapter" / "adapter_model.safetensors")
    wb = load_file(ref / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and any("vision_tower" in k for k in wa)
    if weight_tol is not None:
        assert max(float((wa[k] - wb[k].to(wa[k].device)).abs().max()) for k in wa) < weight_tol
    else:  # GPU kernels are not deterministic, and Adam magnifies that where a gradient is near zero: in aggregate
        diff = sum(float((wa[k] - wb[k].to(wa[k].device)).abs().sum()) for k in wa)
        size = sum(float(wb[k].abs().sum()) for k in wa)
        assert diff < 0.02 * size, (diff, size)


@pytest.mark.slow
def test_preference_objective_under_ddp_matches_one_process(demo, mpo, tmp_path):
    """train.objective=mpo with a vision LoRA: 2 DDP ranks x 1 pair give the same losses, BCO running mean
    and adapter as 1 process x 2 pairs (pairs normalised over the global batch, the running mean's update
    summed over the ranks, each rank's shared-tile forward outside the DDP module's own forward)."""
    extra, single = mpo
    launch(demo, tmp_path / "ddp", 2, *extra)
    assert_same_preference_run(tmp_path / "ddp", single)


@pytest.mark.slow
def test_preference_objective_under_zero3_matches_one_process(demo, mpo, tmp_path):
    """Only where DeepSpeed is installed (CPU, one process): ZeRO-3 with every weight partitioned
    (persistence threshold 0, so no module keeps whole weights) gathers a module's weights only when the
    module runs; the preference forward then goes through the model's own forward with each answer's
    tiles, and gives the unsharded run's losses, running mean and adapter."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed")
    extra, single = mpo
    ds = json.loads((CONFIGS / "deepspeed" / "zero3.json").read_text())
    ds["optimizer"]["params"]["torch_adam"] = True
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(ds))
    launch(demo, tmp_path / "zero3", 1, *extra, f"train.deepspeed={path}", "train.dummy_vision=always")
    assert_same_preference_run(tmp_path / "zero3", single, weight_tol=1e-3)


@pytest.mark.gpu
def test_preference_objective_under_fsdp_on_a_gpu(demo, tmp_path):
    """FSDP2 (configs/fsdp.yaml's settings) on one GPU: the root module's weights (embeddings, projector,
    LM head) are sharded tensors outside the wrapped model's forward, so a preference forward that embeds
    outside it fails there; through the model's own forward it matches the unsharded run on the same GPU,
    and the saved adapter holds the same weights (FSDP's own activation-checkpoint wrapper made PEFT save
    an empty one)."""
    import yaml

    from internvl_lora.data.synthetic import make_preference_dataset

    data = make_preference_dataset(tmp_path / "pairs", n_train=12, n_heldout=2)
    extra = ["train.objective=mpo", f"data.meta={data / 'meta.json'}", "train.dummy_vision=always"]
    fsdp = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())["train"]["fsdp_config"]
    path = tmp_path / "fsdp.json"
    path.write_text(json.dumps(fsdp))
    launch(demo, tmp_path / "plain", 1, *extra)
    proc = launch(demo, tmp_path / "fsdp", 1, *extra, "train.fsdp=true", f"train.fsdp_config={path}")
    assert "this run uses DDP" not in proc.stdout + proc.stderr  # accelerate did enable FSDP
    assert_same_preference_run(tmp_path / "fsdp", tmp_path / "plain", rel=1e-3, weight_tol=None)
