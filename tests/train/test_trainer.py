"""Token-budget batching end to end on the tiny InternVL (`data.max_tokens_per_batch`): every training
sample is loaded exactly once per epoch, every micro-batch stays within the budget (padded: rows x
longest; packed: the row's length), and the run trains the planned number of steps."""

from __future__ import annotations

from collections import Counter

import pytest
from safetensors.torch import load_file

from internvl_lora.run_dir import read_metrics
from internvl_lora.config import load_config
from internvl_lora.data.batching import TokenBudgetBatchSampler

pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures one_thread, demo: tests/conftest.py

BUDGET = 300  # the demo's samples have 51..151 tokens: 1 to 5 samples per micro-batch


@pytest.mark.parametrize("packing", [False, True])
def test_budget_batches_see_every_sample_once_per_epoch_within_the_budget(demo, tmp_path, monkeypatch, packing):
    import internvl_lora.train as train_mod
    from internvl_lora.data.dataset import SupervisedDataset

    loaded, batches = [], []  # dataset indices in load order; (sample lengths, input_ids shape) per micro-batch
    getitem = SupervisedDataset.__getitem__

    def recording_getitem(self, i):
        if self.train:
            loaded.append(i)
        return getitem(self, i)

    make_collator = train_mod.data_collator

    class Recording:
        def __init__(self, inner):
            self.inner, self.packed = inner, inner.packed  # the trainer asks `.packed`: packed / padded rows

        def __call__(self, features):
            batch = self.inner(features)
            batches.append(([len(f["input_ids"]) for f in features], tuple(batch["input_ids"].shape)))
            return batch

    def recording_collator(*a, **kw):
        return Recording(make_collator(*a, **kw))

    monkeypatch.setattr(SupervisedDataset, "__getitem__", recording_getitem)
    monkeypatch.setattr(train_mod, "data_collator", recording_collator)
    out = tmp_path / "run"
    cfg = load_config(demo, [
        f"train.output_dir={out}", "train.report_to=[]", "train.logging_steps=1", "train.save_steps=1000",
        "train.epochs=2", "train.grad_accum=2", "train.warmup_ratio=0", "train.per_device_batch_size=1",
        "data.num_workers=0", "data.max_length=160", f"data.max_tokens_per_batch={BUDGET}",
        f"data.packing={str(packing).lower()}"])
    train_mod.train(cfg)

    n = 16  # the demo's training samples
    assert len(loaded) == 2 * n and Counter(loaded) == Counter({i: 2 for i in range(n)})
    assert sorted(loaded[:n]) == list(range(n))  # the first epoch alone holds each sample once
    assert loaded[:n] != loaded[n:]  # reshuffled for the second epoch
    for lengths, shape in batches:
        assert sum(lengths) <= BUDGET
        if packing:
            assert shape == (1, sum(lengths))
        else:
            assert shape == (len(lengths), max(lengths)) and shape[0] * shape[1] <= BUDGET
    assert max(len(lengths) for lengths, _ in batches) >= 3  # more samples than per_device_batch_size=1
    # exactly the sampler's micro-batches, epoch by epoch, with the cost model of the collator
    sizes = [len(lengths) for lengths, _ in batches]
    groups = [loaded[sum(sizes[:k]):sum(sizes[:k + 1])] for k in range(len(sizes))]
    length_of = dict(zip(loaded, (m for lengths, _ in batches for m in lengths)))
    sampler = TokenBudgetBatchSampler([length_of[i] for i in range(n)], BUDGET, cfg.train.seed, padded=not packing)
    assert len(batches) == 2 * len(sampler)
    assert groups == sampler.batches(0) + sampler.batches(1)
    assert len(batches) < 2 * n  # hence fewer micro-batches than samples

    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    per_epoch = len(batches) // 2
    assert [r["step"] for r in steps] == list(range(1, 2 * -(-per_epoch // 2) + 1))  # grad_accum 2, per epoch
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in steps)  # finite
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert max(float(w.abs().max()) for k, w in weights.items() if "lora_B" in k) > 1e-4  # it trained


@pytest.mark.slow
def test_ddp_two_ranks_match_one_rank_with_the_same_micro_batches(demo, tmp_path):
    """2 processes x grad_accum 1 and 1 process x grad_accum 2 train on the same micro-batches in the same
    steps (the sampler deals one shared list round-robin; with this budget it has an even count, so no
    split differs): the same loss curve. accelerate re-sharding the micro-batches would halve the steps."""
    import os
    import subprocess
    import sys

    from internvl_lora.train import train

    common = ["train.report_to=[]", "train.logging_steps=1", "train.save_steps=1000", "train.epochs=2",
              "train.warmup_ratio=0", "policy.dropout=0", "data.num_workers=0", "data.max_length=160",
              f"data.max_tokens_per_batch={BUDGET}", "train.per_device_batch_size=1",
              "data.packing=false"]  # padded cost: this budget gives an even micro-batch count (see above)
    train(load_config(demo, common + [f"train.output_dir={tmp_path / 'one'}", "train.grad_accum=2",
                                      "train.dummy_vision=always"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "internvl_lora.cli", "train", str(demo), *common, f"train.output_dir={tmp_path / 'two'}",
         "train.grad_accum=1"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    one = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    two = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in two] == [r["step"] for r in one] and len(one) >= 4
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
        assert a["trained_tokens"] == b["trained_tokens"]
    wa = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


def test_resume_mid_epoch_continues_the_same_micro_batches(demo, tmp_path):
    """A run resumed from a checkpoint inside its second epoch ends with the same adapter as the
    uninterrupted run: the Trainer skips the epoch's first micro-batches, which are the same ones
    (fixed count per epoch, order from (seed, epoch) only)."""
    import shutil

    from internvl_lora.train import train

    def run(out, *extra):
        return train(load_config(demo, [
            f"train.output_dir={out}", "train.report_to=[]", "train.logging_steps=1", "train.save_steps=4",
            "train.save_total_limit=0", "train.epochs=2", "train.grad_accum=1", "train.warmup_ratio=0",
            "policy.dropout=0", "data.num_workers=0", "data.max_length=160", f"data.max_tokens_per_batch={BUDGET}",
            *extra]))

    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    run(ref)
    steps = [r["step"] for r in read_metrics(ref / "metrics.jsonl") if "loss" in r]
    per_epoch = len(steps) // 2
    assert per_epoch > 4  # checkpoint-(per_epoch + 1 or more) lies inside the second epoch
    ckpt = next(c for c in sorted(ref.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
                if per_epoch < int(c.name.split("-")[1]) < 2 * per_epoch)
    resumed.mkdir()
    shutil.copytree(ckpt, resumed / ckpt.name)
    shutil.copy(ref / "config.yaml", resumed / "config.yaml")
    shutil.copy(ref / "metrics.jsonl", resumed / "metrics.jsonl")
    run(resumed, "train.resume=true")

    got = {r["step"]: r["loss"] for r in read_metrics(resumed / "metrics.jsonl") if "loss" in r}
    want = {r["step"]: r["loss"] for r in read_metrics(ref / "metrics.jsonl") if "loss" in r}
    assert got.keys() == want.keys()
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=1e-6), s
    wa = load_file(resumed / "adapter" / "adapter_model.safetensors")
    wb = load_file(ref / "adapter" / "adapter_model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6
