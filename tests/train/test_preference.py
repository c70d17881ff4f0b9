"""The preference objective (train.objective=mpo) against independent implementations, on a tiny model in
float32: each loss term, the BCO running mean, SFT-only weights, the reference (adapters disabled),
packed vs padded, tiles encoded once, the running mean across a resume, and a short training run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from internvl_lora.internvl.constants import IGNORE_INDEX

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pref(demo_folder, tmp_path_factory):
    """(folder, tokenizer, settings, preference dataset, LoRA model with random B matrices, policy)."""
    from internvl_lora.config import load_config
    from internvl_lora.data.audit import audit
    from internvl_lora.data.dataset import PreferenceDataset
    from internvl_lora.data.encode import EncodeSettings
    from internvl_lora.data.meta import load_meta
    from internvl_lora.data.synthetic import make_preference_dataset
    from internvl_lora.internvl.checkpoint import inspect_checkpoint, load_model, load_tokenizer
    from internvl_lora.lora.policy import apply_policy

    d = demo_folder(16, 4, copy_to=tmp_path_factory.mktemp("pref"))
    make_preference_dataset(d / "pdata", n_train=12, n_heldout=8)
    info = inspect_checkpoint(d / "model")
    tok = load_tokenizer(d / "model")
    s = EncodeSettings.from_checkpoint(info, max_length=1024)
    result = audit(load_meta(d / "pdata/meta.json"), tok, s, objective="mpo")
    assert result.ok and len(result.valid) == 12
    ds = PreferenceDataset(result, tok, s, train=False)
    cfg = load_config(d / "train.yaml", ["policy.dropout=0.0"])
    torch.manual_seed(0)
    model = apply_policy(load_model(d / "model", dtype=torch.float32), cfg.policy, info.llm_type)
    with torch.no_grad():  # a policy that differs from the reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()
    return d, tok, s, ds, model


def _batch(tok, s, items, packing):
    from internvl_lora.data.collate import HostSide, data_collator

    return HostSide(data_collator(tok, s, False, packing, preference=True))(items)


def _independent_logp(model, ids, labels, pixels):
    """Sum of log p(label) over the trained tokens of one sequence: the model's own forward, full logits."""
    kw = {"pixel_values": pixels} if pixels is not None else {}
    logits = model(input_ids=ids[None], use_cache=False, **kw).logits[0].float()
    lp = torch.log_softmax(logits[:-1], -1)
    target = labels[1:]
    keep = target != IGNORE_INDEX
    return lp[keep].gather(-1, target[keep, None]).sum(), int(keep.sum())


def _independent_pair(model, item):
    from internvl_lora.train.preference import adapters_disabled

    px = item.get("pixel_values")
    with torch.no_grad():
        pc, n = _independent_logp(model, item["chosen_input_ids"], item["chosen_labels"], px)
        pr, _ = _independent_logp(model, item["rejected_input_ids"], item["rejected_labels"], px)
        with adapters_disabled(model):
            rc, _ = _independent_logp(model, item["chosen_input_ids"], item["chosen_labels"], px)
            rr, _ = _independent_logp(model, item["rejected_input_ids"], item["rejected_labels"], px)
    return float(pc), float(pr), float(rc), float(rr), n


def _logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def test_each_term_equals_its_formula_and_the_running_mean_the_official_one(pref):
    from internvl_lora.train.preference import PreferenceObjective

    _, tok, s, ds, model = pref
    beta, w = 0.1, (0.8, 0.2, 1.0)
    obj = PreferenceObjective(model, beta, *w)
    seen = []  # every pair's mean reward so far: the official RunningMoments mean (batch of 1 per device)
    for batch_items in ([ds[i] for i in range(0, 3)], [ds[i] for i in range(3, 7)]):
        pairs = [_independent_pair(model, it) for it in batch_items]
        seen += [(beta * (pc - rc) + beta * (pr - rr)) / 2 for pc, pr, rc, rr, _ in pairs]
        delta = sum(seen) / len(seen)
        expected, sig, bco, sft = [], [], [], []
        for pc, pr, rc, rr, n in pairs:
            sig.append(-_logsig(beta * ((pc - pr) - (rc - rr))))
            bco.append(-_logsig(beta * (pc - rc) - delta) - _logsig(-(beta * (pr - rr) - delta)))
            sft.append(-pc / n)
            expected.append(w[0] * sig[-1] + w[1] * bco[-1] + w[2] * sft[-1])
        model.train()  # training: the running mean moves
        try:
            with torch.no_grad():
                loss = obj(model, _batch(tok, s, batch_items, packing=True))
        finally:
            model.eval()
        m = obj.pop_metrics("train")
        k = len(pairs)
        assert float(loss) == pytest.approx(sum(expected) / k, rel=1e-5, abs=1e-6)
        assert m["loss/sigmoid"] == pytest.approx(sum(sig) / k, rel=1e-4, abs=1e-6)
        assert m["loss/bco_pair"] == pytest.approx(sum(bco) / k, rel=1e-4, abs=1e-6)
        assert m["loss/sft"] == pytest.approx(sum(sft) / k, rel=1e-4, abs=1e-6)
        assert m["bco_delta"] == pytest.approx(delta, rel=1e-4, abs=1e-6)
        margins = [beta * ((pc - rc) - (pr - rr)) for pc, pr, rc, rr, _ in pairs]
        assert m["rewards/margin"] == pytest.approx(sum(margins) / k, rel=1e-4, abs=1e-6)
        assert m["rewards/accuracy"] == pytest.approx(sum(x > 0 for x in margins) / k)
        assert m["logps/chosen"] == pytest.approx(sum(p[0] for p in pairs) / k, rel=1e-5)
    # evaluation reads the running mean but does not move it (the official trainer moves it: a fix)
    before = float(obj.running.mean())
    with torch.no_grad():
        obj(model, _batch(tok, s, [ds[7], ds[8]], packing=True))
    assert float(obj.running.mean()) == before
    assert obj.pop_metrics("eval")["eval_bco_delta"] == pytest.approx(before, rel=1e-5)


def test_sft_only_weights_give_the_sft_loss_on_the_chosen_answers(pref):
    from internvl_lora.data.collate import PadCollator
    from internvl_lora.train.loss import trained_positions_loss
    from internvl_lora.train.preference import PreferenceObjective

    _, tok, s, ds, model = pref
    items = [ds[i] for i in range(4)]
    obj = PreferenceObjective(model, 0.1, 0.0, 0.0, 1.0)
    with torch.no_grad():
        mpo = obj(model, _batch(tok, s, items, packing=False))
        chosen = PadCollator(tok.pad_token_id)([{"input_ids": it["chosen_input_ids"], "labels": it["chosen_labels"],
                                                  **({"pixel_values": it["pixel_values"]} if "pixel_values" in it else {})}
                                                 for it in items])
        # the official SFT term: each chosen answer's token mean, averaged over the pairs ("sample" reduction)
        sft = trained_positions_loss(model, chosen, num_items_in_batch=len(items), reduction="sample")
    assert float(mpo) == pytest.approx(float(sft), rel=1e-5)


def test_adapters_disabled_give_the_reference_and_a_fresh_adapter_gives_zero_rewards(pref):
    from internvl_lora.internvl.embed import embed_with_tiles
    from internvl_lora.train.preference import PreferenceObjective, adapters_disabled, sequence_logps

    _, tok, s, ds, model = pref
    b = _batch(tok, s, [ds[i] for i in range(3)], packing=True)
    with torch.no_grad():
        embeds, _ = embed_with_tiles(model, b["input_ids"], b["pixel_values"], b["tile_index"])
        policy, _ = sequence_logps(model, embeds, b, b["labels"])
        with adapters_disabled(model):
            embeds, _ = embed_with_tiles(model, b["input_ids"], b["pixel_values"], b["tile_index"])
            ref, _ = sequence_logps(model, embeds, b, b["labels"])
    independent = [_independent_pair(model, ds[i]) for i in range(3)]
    assert torch.allclose(ref, torch.tensor([x for p in independent for x in p[2:4]]), atol=1e-4)
    assert torch.allclose(policy, torch.tensor([x for p in independent for x in p[0:2]]), atol=1e-4)
    assert not torch.allclose(policy, ref)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    try:
        with torch.no_grad():  # a fresh adapter (B = 0): the policy is the reference
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.zero_()
            obj = PreferenceObjective(model, 0.1, 0.8, 0.2, 1.0)
            obj(model, b)
        m = obj.pop_metrics("eval")
        assert m["eval_rewards/chosen"] == 0 and m["eval_rewards/rejected"] == 0
        assert m["eval_loss/sigmoid"] == pytest.approx(math.log(2), rel=1e-6)
        assert m["eval_loss/bco_pair"] == pytest.approx(2 * math.log(2), rel=1e-6)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])


def test_packed_equals_padded_and_each_tile_is_encoded_once(pref):
    from internvl_lora.internvl.embed import internvl_model
    from internvl_lora.train.preference import PreferenceObjective

    _, tok, s, ds, model = pref
    items = [ds[i] for i in range(5)]
    tiles = sum(it["pixel_values"].shape[0] for it in items if "pixel_values" in it)
    seen = []
    hook = internvl_model(model).model.vision_tower.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append(kwargs.get("pixel_values", args[0] if args else None).shape[0]),
        with_kwargs=True)
    try:
        losses = []
        for packing in (False, True):
            seen.clear()
            obj = PreferenceObjective(model, 0.1, 0.8, 0.2, 1.0)
            with torch.no_grad():
                losses.append(float(obj(model, _batch(tok, s, items, packing))))
            # the policy pass encodes each tile once for both answers; the frozen vision is not run again
            # for the reference (its features are reused)
            assert seen == [tiles], (seen, tiles)
    finally:
        hook.remove()
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_gradient_of_the_shared_tiles_is_the_sum_of_both_uses(pref):
    """With a trained projector, the loss's gradient equals the one of a forward that encodes the tiles
    separately for each answer (what the official code does)."""
    from internvl_lora.internvl.embed import embed_with_tiles, image_features

    _, tok, s, ds, model = pref
    b = _batch(tok, s, [ds[0], ds[1]], packing=True)
    proj = next(p for n, p in model.named_parameters() if "multi_modal_projector" in n and n.endswith("weight"))
    proj.requires_grad_(True)
    try:
        def grad_of(embeds):
            proj.grad = None
            embeds.pow(2).mean().backward()
            return proj.grad.clone()

        shared, _ = embed_with_tiles(model, b["input_ids"], b["pixel_values"], b["tile_index"])
        g1 = grad_of(shared)
        twice = image_features(model, b["pixel_values"][b["tile_index"]])  # every use encoded on its own
        embeds = internvl_model_embeds(model, b["input_ids"])
        mask = (b["input_ids"] == model.config.image_token_id).unsqueeze(-1)
        g2 = grad_of(embeds.masked_scatter(mask.expand_as(embeds), twice.reshape(-1, twice.shape[-1])))
    finally:
        proj.requires_grad_(False)
        proj.grad = None
    assert torch.allclose(g1, g2, atol=1e-6)


@pytest.mark.parametrize("packing,vision", [(False, "frozen"), (True, "frozen"), (True, "lora")])
def test_sharded_path_through_the_models_own_forward_equals_the_shared_tile_path(pref, packing, vision):
    """FSDP / ZeRO-3 gather a module's weights only inside the wrapped model's forward: there the collator
    expands each answer's tiles (blank tile for text-only batches) and the model embeds them itself. Loss,
    per-pair terms and every trained gradient equal the shared-tile path's; the vision tower then sees each
    tile twice per forward (policy and reference), as in the official trainer."""
    from internvl_lora.data.collate import HostSide, data_collator
    from internvl_lora.internvl.embed import internvl_model
    from internvl_lora.train.preference import PreferenceObjective

    d, tok, s, ds, model = pref
    if vision == "lora":  # a trained vision part: the reference runs its own vision pass in both paths
        from internvl_lora.config import load_config
        from internvl_lora.internvl.checkpoint import load_model
        from internvl_lora.lora.policy import apply_policy

        torch.manual_seed(0)
        cfg = load_config(d / "train.yaml", ["policy.dropout=0.0", "policy.vision=lora"])
        model = apply_policy(load_model(d / "model", dtype=torch.float32), cfg.policy, "qwen2")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    items = [ds[i] for i in range(4)]
    tiles = sum(it["pixel_values"].shape[0] for it in items if "pixel_values" in it)
    text_only = [{k: v for k, v in items[0].items() if k != "pixel_values"}]
    img = model.config.image_token_id
    for k in ("chosen_input_ids", "rejected_input_ids"):  # its image tokens become ordinary text tokens
        text_only[0][k] = torch.where(text_only[0][k] == img, tok.convert_tokens_to_ids("A"), text_only[0][k])
    trained = [p for p in model.parameters() if p.requires_grad]
    seen = []
    hook = internvl_model(model).model.vision_tower.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append(kwargs.get("pixel_values", args[0] if args else None).shape[0]),
        with_kwargs=True)
    model.train()
    try:
        for batch_items, per_forward in ((items, 2 * tiles), (text_only, 1)):  # text-only: one blank tile
            results = []
            for sharded in (False, True):
                batch = HostSide(data_collator(tok, s, True, packing, preference=True, sharded=sharded))(batch_items)
                assert ("tile_index" in batch) != sharded
                obj = PreferenceObjective(model, 0.1, 0.8, 0.2, 1.0, dummy_vision=True, shared_tiles=not sharded)
                for p in trained:
                    p.grad = None
                seen.clear()
                loss = obj(model, batch)
                loss.backward()
                if sharded:
                    assert seen == [per_forward] * 2, seen
                elif batch_items is items:  # shared: once, and again for the reference if the vision part trains
                    assert seen == [tiles] * (2 if vision == "lora" else 1), seen
                results.append((float(loss.detach()), obj.pop_metrics("train"), [p.grad.clone() for p in trained]))
            (l1, m1, g1), (l2, m2, g2) = results
            assert l1 == pytest.approx(l2, rel=1e-5)
            assert m1.keys() == m2.keys() and all(m1[k] == pytest.approx(m2[k], rel=1e-4, abs=1e-6) for k in m1)
            assert max(float((a - b).abs().max()) for a, b in zip(g1, g2)) < 1e-5
            assert any(float(g.abs().max()) > 0 for g in g1)
            if vision == "lora" and batch_items is items:  # (the blank tile's gradient is zero)
                names = [n for n, p in model.named_parameters() if p.requires_grad]
                assert any(float(g.abs().max()) > 0 for n, g in zip(names, g1) if "vision_tower" in n)
    finally:
        hook.remove()
        model.eval()
        for p in trained:
            p.grad = None


def internvl_model_embeds(model, ids):
    from internvl_lora.internvl.embed import internvl_model

    return internvl_model(model).get_input_embeddings()(ids)


def test_training_logs_rewards_and_the_running_mean_is_saved_with_each_checkpoint(pref, tmp_path):
    from internvl_lora.config import load_config
    from internvl_lora.run_dir import read_metrics
    from internvl_lora.train import train
    from internvl_lora.train.preference import PREFERENCE_STATE

    d = pref[0]
    out = tmp_path / "run"
    cfg = load_config(d / "train.yaml", [
        "train.objective=mpo", f"data.meta={d}/pdata/meta.json", f"data.eval_meta={d}/pdata/heldout_meta.json",
        f"train.output_dir={out}", "train.max_steps=4", "train.logging_steps=2", "train.save_steps=2",
        "train.eval_steps=4", "train.report_to=[]", "data.num_workers=0"])
    train(cfg)
    records = read_metrics(out / "metrics.jsonl")
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for key in ("rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected", "loss/sigmoid",
                "loss/bco_pair", "loss/sft", "bco_delta"):
        assert all(key in r for r in logged), key
    assert any("eval_rewards/accuracy" in r for r in records)
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["stateful_callbacks"]
    saved = state[PREFERENCE_STATE]["attributes"]
    assert saved["count"] > 0 and math.isfinite(saved["total"])
    assert records[-1].get("step") == 4


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_adapter_and_running_mean(pref, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from internvl_lora.config import load_config
    from internvl_lora.train import train

    d = pref[0]

    def ov(out):
        return ["train.objective=mpo", f"data.meta={d}/pdata/meta.json", f"train.output_dir={out}",
                "train.epochs=2", "train.per_device_batch_size=2", "train.grad_accum=2", "train.save_steps=1",
                "train.save_total_limit=2", "train.logging_steps=1", "train.report_to=[]", "data.num_workers=0",
                "train.lr=1e-3", "policy.dropout=0.05"]

    ref, run = tmp_path / "ref", tmp_path / "run"
    train(load_config(d / "train.yaml", ov(ref)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cli = [sys.executable, "-m", "internvl_lora.cli", "train", str(d / "train.yaml")]
    proc = subprocess.Popen([*cli, *ov(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (run / "checkpoint-2" / "trainer_state.json").exists():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    resumed = subprocess.run([*cli, *ov(run), "train.resume=true"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    a = load_file(ref / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    from internvl_lora.run_dir import read_metrics

    def curve(out):
        return [(r["step"], r["loss"], r["bco_delta"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r]

    assert curve(run) == curve(ref)
