"""Packed (varlen) attention, partial recomputation and the speed options (`internvl_lora.train.speed`)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from internvl_lora.data.collate import PackedCollator, PadCollator
from internvl_lora.internvl.checkpoint import load_model
from internvl_lora.train.loss import trained_positions_loss
from internvl_lora.train.speed import VARLEN, register_varlen_attention


@pytest.mark.slow
def test_packed_varlen_loss_equals_padded(tiny_items):
    d, tok, items = tiny_items
    torch.manual_seed(0)
    model = load_model(d / "model").eval()
    padded = PadCollator(tok.pad_token_id)(items)
    with torch.no_grad():
        stock = model(**padded, use_cache=False).loss
        n = (padded["labels"][:, 1:] != -100).sum()
        fast_padded = trained_positions_loss(model, padded, n)
        model.set_attn_implementation({"text_config": register_varlen_attention()})
        assert model.config.text_config._attn_implementation == VARLEN
        packed = trained_positions_loss(model, PackedCollator()(items), n)
    assert torch.allclose(stock, fast_padded, rtol=1e-5, atol=1e-6)
    assert torch.allclose(stock, packed, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_packed_gradients_equal_padded(tiny_items):
    d, tok, items = tiny_items
    grads = []
    for packed in (False, True):
        model = load_model(d / "model")
        model.train()
        if packed:
            model.set_attn_implementation({"text_config": register_varlen_attention()})
            batch = PackedCollator()(items)
        else:
            batch = PadCollator(tok.pad_token_id)(items)
        n = sum((it["labels"][1:] != -100).sum() for it in items)
        loss = trained_positions_loss(model, batch, n)
        loss.backward()
        grads.append(model.model.language_model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_varlen_without_boundaries_is_sdpa(tiny_items):
    """A model trained with packing still evaluates and generates on ordinary padded batches: without
    cu_seq_lens the packed attention is SDPA with the padding mask (same logits, same generations)."""
    d, tok, items = tiny_items
    sdpa = load_model(d / "model").eval()
    varlen = load_model(d / "model").eval()
    varlen.set_attn_implementation({"text_config": register_varlen_attention()})
    batch = PadCollator(tok.pad_token_id)(items[:3])
    assert (batch["attention_mask"] == 0).any()  # really padded
    with torch.no_grad():
        a = sdpa(**batch, use_cache=False).logits
        b = varlen(**batch, use_cache=False).logits
    keep = batch["attention_mask"].bool()
    assert torch.allclose(a[keep], b[keep], rtol=1e-5, atol=1e-5)
    left = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ga = sdpa.generate(**left, max_new_tokens=4, do_sample=False)
        gb = varlen.generate(**left, max_new_tokens=4, do_sample=False)
    assert torch.equal(ga, gb)


@pytest.mark.slow
def test_training_with_packing_follows_the_padded_loss_curve(demo_folder, tmp_path):
    """`data.packing: true` (packed rows, varlen attention, loss on trained positions) trains like padding."""
    import json

    from internvl_lora.config import load_config
    from internvl_lora.train import train

    cfg_path = demo_folder(16, 2, copy_to=tmp_path / "d") / "train.yaml"
    curves = {}
    for packing in (False, True):
        out = tmp_path / f"run-{packing}"
        cfg = load_config(cfg_path, [f"data.packing={str(packing).lower()}", "train.max_steps=4", "train.logging_steps=1",
                                     "train.per_device_batch_size=4", "policy.dropout=0.0", "train.report_to=[]",
                                     "train.save_steps=1000", f"train.output_dir={out}"])
        train(cfg)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        curves[packing] = [r["loss"] for r in rows if "loss" in r]
    assert len(curves[False]) == 4
    for a, b in zip(curves[False], curves[True]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), curves


def test_sdpa_cudnn_backend_is_turned_off_on_a_gpu(monkeypatch, peft_block):
    """cuDNN attention plans per input shape (the vision tower's batch changes every step): off on a GPU."""
    from internvl_lora.config import TrainArgs
    from internvl_lora.train.speed import speed_options

    was = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        done = speed_options(peft_block(0.0), TrainArgs(fused=False), before_adapters=False)
        assert done == ["SDPA without cuDNN"] and not torch.backends.cuda.cudnn_sdp_enabled()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        torch.backends.cuda.enable_cudnn_sdp(True)
        assert speed_options(peft_block(0.0), TrainArgs(fused=False), before_adapters=False) == []
        assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


def test_checkpoint_some_layers():
    from internvl_lora.train.speed import checkpoint_some_layers

    class L:
        gradient_checkpointing = True

    layers = [L() for _ in range(28)]
    for layer in layers:
        layer.gradient_checkpointing = True
    chosen = checkpoint_some_layers(layers, 0.5)
    assert len(chosen) == 14 and chosen[:3] == [0, 2, 4]
    assert [i for i, layer in enumerate(layers) if layer.gradient_checkpointing] == chosen
    layers = [L() for _ in range(28)]
    for layer in layers:
        layer.gradient_checkpointing = True
    assert len(checkpoint_some_layers(layers, 0.7)) == 20
    assert sum(layer.gradient_checkpointing for layer in layers) == 20
    assert checkpoint_some_layers(layers, 0.0) == [] and not any(layer.gradient_checkpointing for layer in layers)


@pytest.mark.slow
def test_training_options_fused_lora_and_checkpoint_share(demo_folder, tmp_path, capsys, loss_curve):
    """train.fused_lora gives the loss curve of PEFT's path (float32, dropout on); train.checkpoint_layers
    recomputes only that share of the LLM layers without changing the numbers; square loss trains."""
    cfg_path = demo_folder(16, 2, copy_to=tmp_path / "d") / "train.yaml"
    ref = loss_curve(cfg_path, tmp_path / "ref", ["train.fused=false", "policy.dropout=0.1"])
    fused = loss_curve(cfg_path, tmp_path / "fused", ["train.fused=true", "policy.dropout=0.1",
                                                      "train.gradient_checkpointing=true", "train.checkpoint_layers=0.5"])
    printed = capsys.readouterr().out
    assert "fused LoRA layers: " in printed and "chunked loss" in printed and "activation checkpointing on 2 of 3 LLM decoder layers" in printed
    assert len(ref) == 4
    for a, b in zip(ref, fused):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (ref, fused)
    square = loss_curve(cfg_path, tmp_path / "square", ["train.loss_reduction=square", "data.packing=true"])
    assert len(square) == 4 and all(x == x and x > 0 for x in square)


@pytest.mark.parametrize("sharded", [{}, {"fsdp": True}, {"deepspeed": "configs/deepspeed/zero3.json"}])
def test_fused_lora_stays_off_with_sharded_weights(sharded, peft_block):
    """ZeRO-3 and FSDP keep PEFT's own LoRA path (the fused one was only run with whole weights)."""
    from pathlib import Path

    from internvl_lora.config import TrainArgs
    from internvl_lora.lora.fused import FusedLoraLinear
    from internvl_lora.train.speed import speed_options
    from internvl_lora.train.trainer import sharded_weights

    if "deepspeed" in sharded:
        sharded = {"deepspeed": str(Path(__file__).resolve().parents[2] / sharded["deepspeed"])}
    model = peft_block(0.1)
    t = TrainArgs(**sharded)
    done = speed_options(model, t, before_adapters=False, sharded=sharded_weights(t))
    fused = [m for m in model.modules() if type(m) is FusedLoraLinear]
    if sharded:
        assert not fused and "off under ZeRO-3 / FSDP" in done[0]
    else:
        assert len(fused) == 5 and done[0] == "fused LoRA layers: 5"


def test_speed_options_switches_are_restored_after_training(monkeypatch, peft_block):
    """speed_options turns SDPA's cuDNN backend off on a GPU; `backend_switches_restored` (around train())
    puts it back, also when training fails."""
    from internvl_lora.config import TrainArgs
    from internvl_lora.train.speed import backend_switches_restored, speed_options

    was = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        with backend_switches_restored():
            assert speed_options(peft_block(0.0), TrainArgs(fused=False), before_adapters=False) == ["SDPA without cuDNN"]
            assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.cudnn_sdp_enabled()
        with pytest.raises(RuntimeError), backend_switches_restored():
            speed_options(peft_block(0.0), TrainArgs(fused=False), before_adapters=False)
            raise RuntimeError("training failed")
        assert torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(False)  # a user's own choice is kept as well
        with backend_switches_restored():
            torch.backends.cuda.enable_cudnn_sdp(True)
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


def test_train_restores_the_switches_when_it_fails(monkeypatch):
    """train() runs inside `backend_switches_restored`: a failure after the speed options still restores them."""
    import internvl_lora.train as train_mod

    was = torch.backends.cuda.cudnn_sdp_enabled()

    def failing(cfg):
        torch.backends.cuda.enable_cudnn_sdp(False)  # what speed_options does on a GPU
        raise RuntimeError("out of memory")

    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        monkeypatch.setattr(train_mod, "_train", failing)
        with pytest.raises(RuntimeError):
            train_mod.train(None)
        assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


def test_varlen_gqa_probe_runs_on_first_use_only():
    """Importing the module probes nothing; the answer is computed once, then cached."""
    from internvl_lora.train import speed

    speed._varlen_supports_gqa.cache_clear()
    assert speed._varlen_supports_gqa.cache_info().currsize == 0
    first = speed._varlen_supports_gqa()
    assert isinstance(first, bool) and speed._varlen_supports_gqa.cache_info().currsize == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_attention_on_a_gpu_in_every_dtype(dtype):
    """float32 packed training on a GPU (the demo's dtype) used to reach the flash-based varlen kernel, which
    takes fp16 / bf16 only; every dtype must give per-sample causal attention."""
    from internvl_lora.train.speed import _varlen_attention

    torch.manual_seed(0)
    lens = [5, 11, 7]
    cu = torch.tensor([0, 5, 16, 23], dtype=torch.int32, device="cuda")
    q = torch.randn(1, 4, 23, 16, device="cuda", dtype=dtype)
    k, v = (torch.randn(1, 2, 23, 16, device="cuda", dtype=dtype) for _ in range(2))
    out, _ = _varlen_attention(None, q, k, v, None, scaling=0.25, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=11)
    a = 0
    for n in lens:
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, a:a + n].float(), k[:, :, a:a + n].float(), v[:, :, a:a + n].float(), is_causal=True, scale=0.25,
            enable_gqa=True)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(out[0, a:a + n].float(), ref[0].transpose(0, 1), atol=tol), (dtype, n)
        a += n


def test_warm_up_token_counts_cover_each_specialisation_of_the_count_and_of_its_share_per_multiprocessor():
    """Triton specialises an integer on being a multiple of 16 and on being one; a share of one row per
    multiprocessor is a short micro-batch (a text-only sample of 125 tokens compiled Liger's RMSNorm
    backward in the middle of an 8B run)."""
    from internvl_lora.lora.kernels import CONFIG
    from internvl_lora.train.speed import warm_up_token_counts

    def kind(share):
        return "one" if share == 1 else "16k" if share % 16 == 0 else "other"

    for sms in (108, 114, 132, 144):
        counts = warm_up_token_counts(sms)
        seen = {(n % 16 == 0, kind(math.ceil(n / sms))) for n in counts}
        assert seen == {(m, k) for m in (True, False) for k in ("one", "16k", "other")}, (sms, counts)
        # the fused LoRA kernels' unsplit gradient: a micro-batch within one row block (64 tokens compiled it)
        assert min(counts) <= min(c["rows"] for kind_ in CONFIG.values() for c in kind_.values())


def test_kernel_warm_up_does_nothing_off_a_gpu(qwen2_internvl):
    from internvl_lora.train.speed import language_decoder, warm_up_kernels

    model = qwen2_internvl(hidden=64, inter=128, layers=1)
    state = torch.random.get_rng_state()
    assert warm_up_kernels(language_decoder(model)) is False
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.gpu
def test_after_the_kernel_warm_up_no_token_count_compiles_a_kernel(fast_path_model):
    """The run's first (full) micro-batch compiles what it needs; after the warm-up, micro-batches of any
    other token count (a multiple of 16 or not, a few tokens) compile no Triton kernel -- each compile was
    a 0.3-0.9 s stall of a step in the middle of a run (bench/e2e_bench.py, 1B, H100). And the warm-up
    leaves the random number generators and every gradient as they were."""
    triton = pytest.importorskip("triton")
    knobs = getattr(triton, "knobs", None)
    if knobs is None or not hasattr(knobs.runtime, "jit_post_compile_hook"):
        pytest.skip("this triton has no compile hook")
    from internvl_lora.train.memory import layer_inputs, training_autocast
    from internvl_lora.train.speed import warm_up_kernels

    model, decoder = fast_path_model()
    layer = decoder.layers[0]

    def step(n):  # as a training step runs the layer: under the Trainer's bf16 autocast
        x, kw = layer_inputs(decoder, n, torch.bfloat16, "cuda", requires_grad=True)
        with training_autocast(x):
            out = layer(x, attention_mask=None, **kw)
        out = out[0] if isinstance(out, tuple) else out
        out.float().pow(2).mean().backward()

    step(20480)  # the first, full micro-batch of a run
    rng = (torch.random.get_rng_state(), torch.cuda.get_rng_state())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads
    assert warm_up_kernels(decoder)
    assert torch.equal(rng[0], torch.random.get_rng_state()) and torch.equal(rng[1], torch.cuda.get_rng_state())
    after = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(after) == set(grads) and all(torch.equal(after[n], g) for n, g in grads.items())
    compiled = []
    previous = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = lambda *a, **k: compiled.append((n, getattr(k.get("fn"), "name", a)))
    try:
        for n in (20480, 11041, 3431, 16384, 777, 20475, 2112, 1727, 125, 64, 17, 5):
            step(n)
            torch.cuda.synchronize()  # a compile is recorded with the count that caused it
    finally:
        knobs.runtime.jit_post_compile_hook = previous
    assert compiled == [], compiled


def _autocast_in_layer_norms(module, run):
    """Whether autocast was on in each LayerNorm of `module` while `run()` ran (on a GPU, autocast runs a
    LayerNorm in float32 and returns float32)."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(torch.is_autocast_enabled("cpu")))
             for m in module.modules() if isinstance(m, torch.nn.LayerNorm)]
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    return seen, out


def test_frozen_vision_tower_and_projector_run_in_their_weights_dtype_under_autocast(qwen2_internvl):
    """Under autocast a LayerNorm returns float32 and every linear layer after it casts back: the frozen
    vision tower and projector now run in their bf16 weights with autocast off (as a bf16 model without
    autocast does), the same numbers as calling them outside autocast; the language model keeps autocast."""
    from internvl_lora.config import PolicyArgs, TrainArgs
    from internvl_lora.lora.policy import apply_policy
    from internvl_lora.train.speed import speed_options

    torch.manual_seed(0)
    model = qwen2_internvl(hidden=64, inter=128, layers=1)
    model = apply_policy(model, PolicyArgs(dropout=0.0), "qwen2")
    base = model.get_base_model().model
    keys = list(model.state_dict())
    pixels = torch.randn(2, 3, 448, 448, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = base.get_image_features(pixel_values=pixels)  # bf16 throughout, no autocast

        def under_autocast():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return base.get_image_features(pixel_values=pixels)

        before, _ = _autocast_in_layer_norms(base, under_autocast)
        assert before and all(before)
        done = speed_options(model, TrainArgs(fused=False), before_adapters=False)
        assert "frozen vision_tower (bfloat16), multi_modal_projector (bfloat16) without autocast" in done, done
        after, out = _autocast_in_layer_norms(base, under_autocast)
    assert len(after) == len(before) and not any(after)
    out = out.pooler_output if hasattr(out, "pooler_output") else out
    expected = expected.pooler_output if hasattr(expected, "pooler_output") else expected
    assert torch.equal(out, expected)
    assert type(base.vision_tower).__name__ == "InternVLVisionModel"  # same name, same state dict
    assert list(model.state_dict()) == keys
    import copy
    import pickle

    clone = pickle.loads(pickle.dumps(copy.deepcopy(base.multi_modal_projector)))
    assert clone.weight_dtype == torch.bfloat16 and isinstance(clone, type(base.multi_modal_projector))
    # once only
    assert not any("vision_tower" in d for d in speed_options(model, TrainArgs(fused=False), before_adapters=False))


def test_a_trained_projector_or_float32_weights_keep_autocast(qwen2_internvl):
    from internvl_lora.train.speed import frozen_towers_in_weight_dtype

    model = qwen2_internvl(hidden=64, inter=128, layers=1)
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)  # a projector asked to train
    assert frozen_towers_in_weight_dtype(model) == ["vision_tower (bfloat16)"]
    assert not hasattr(model.model.multi_modal_projector, "weight_dtype")
    model32 = qwen2_internvl(hidden=64, inter=128, layers=1).float().requires_grad_(False)
    assert frozen_towers_in_weight_dtype(model32) == []
    peft_vision = qwen2_internvl(hidden=64, inter=128, layers=1).requires_grad_(False)
    peft_vision.model.vision_tower.encoder.layer[0].attention.q_proj.weight.requires_grad_(True)
    assert frozen_towers_in_weight_dtype(peft_vision) == ["multi_modal_projector (bfloat16)"]


@pytest.mark.gpu
def test_packed_attention_keeps_the_key_value_heads_unrepeated():
    """Grouped-query attention inside the flash kernel: the packed attention's output and gradients equal
    per-sample SDPA, and nothing it keeps for the backward has the query's head count on the key / value
    (repeating them kept 7x the key/value size per layer at the 8B shape, ~2 GiB at 5,120 tokens)."""
    from internvl_lora.train.speed import _varlen_attention

    torch.manual_seed(0)
    h, kv, d, lens = 28, 4, 128, [700, 300, 1024]
    t = sum(lens)
    q = torch.randn(1, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, kv, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, kv, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, 700, 1000, t], device="cuda", dtype=torch.int32)
    saved = []

    def pack(x):
        saved.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out, _ = _varlen_attention(None, q, k, v, None, scaling=d ** -0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                   max_length_q=max(lens))
    assert saved.count((t, h, d)) == 2, saved  # the query and the output; the key and value as they came
    assert saved.count((t, kv, d)) == 2, saved
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    refs = []
    for a, b in zip(cu.tolist()[:-1], cu.tolist()[1:]):
        o = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, a:b].float(), k[:, :, a:b].float(), v[:, :, a:b].float(), is_causal=True, scale=d ** -0.5,
            enable_gqa=True)
        refs.append(o[0].transpose(0, 1))
    ref = torch.cat(refs).unsqueeze(0)
    want = torch.autograd.grad(ref, (q, k, v), g.float())
    assert (out.float() - ref).abs().max() < 2e-2
    for a, b in zip(got, want):
        assert (a.float() - b).abs().max() / b.abs().max() < 2e-2


def test_a_layer_run_under_the_training_autocast_takes_the_fused_lora_path(monkeypatch, qwen2_internvl):
    """PEFT keeps the adapters in float32 on a bf16 base; the fused LoRA layers (and their Triton kernels on a
    GPU) run them only under autocast, as a training step does. The kernel warm-up runs its layer under the
    same autocast (`memory.training_autocast`); without it, it warmed up PEFT's path instead of the kernels."""
    from internvl_lora.config import PolicyArgs
    from internvl_lora.lora import fused
    from internvl_lora.lora.fused import fuse_lora_layers
    from internvl_lora.lora.policy import apply_policy
    from internvl_lora.train.memory import layer_inputs, training_autocast
    from internvl_lora.train.speed import language_decoder

    model = apply_policy(qwen2_internvl(hidden=64, inter=128, layers=1), PolicyArgs(dropout=0.05), "qwen2")
    assert fuse_lora_layers(model) == 7
    calls = []
    real = fused._LoraLinear.apply
    monkeypatch.setattr(fused._LoraLinear, "apply", lambda *a: calls.append(1) or real(*a))
    decoder = language_decoder(model)
    layer = decoder.layers[0].train()
    x, kw = layer_inputs(decoder, 24, torch.bfloat16, "cpu", requires_grad=True)
    layer(x, attention_mask=None, **kw)
    assert calls == []  # outside autocast: PEFT's forward
    with training_autocast(x):
        layer(x, attention_mask=None, **kw)
    assert len(calls) == 7  # q, k, v, o, gate, up, down
    assert isinstance(training_autocast(x.float()), contextlib.nullcontext)


def test_packed_rows_skip_transformers_mask_preparation_with_the_same_numbers(tiny_items, monkeypatch):
    """Packed rows reach the language model with an empty 4-D mask, which transformers passes through:
    its mask preparation, which reads a packed-sample test back to the host (a sync every forward), is
    not run. Same loss and gradients as without; padded batches still get their padding mask."""
    import transformers.masking_utils as mu

    from internvl_lora.train.speed import packed_rows_without_mask_preparation

    d, tok, items = tiny_items
    batch = PackedCollator()(items)
    n = sum((it["labels"][1:] != -100).sum() for it in items)
    results = []
    for hooked in (False, True):
        model = load_model(d / "model").train()
        model.set_attn_implementation({"text_config": register_varlen_attention()})
        if hooked:
            assert packed_rows_without_mask_preparation(model)
            assert packed_rows_without_mask_preparation(model)  # once only
            assert len(model.model.language_model._forward_pre_hooks) == 1
            calls = []
            real = mu.find_packed_sequence_indices
            monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda *a: calls.append(1) or real(*a))
        loss = trained_positions_loss(model, batch, n)
        loss.backward()
        results.append((loss.detach(), model.model.language_model.layers[0].self_attn.q_proj.weight.grad.clone()))
        if hooked:
            assert calls == []
            sdpa = load_model(d / "model").eval()
            padded = PadCollator(tok.pad_token_id)(items[:3])
            with torch.no_grad():
                a = sdpa(**padded, use_cache=False).logits
                b = model.eval()(**padded, use_cache=False).logits
            keep = padded["attention_mask"].bool()
            assert torch.allclose(a[keep], b[keep], rtol=1e-5, atol=1e-5)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_packed_rows_keep_the_mask_preparation_without_varlen_attention(tiny_items):
    """A model without the packed attention (e.g. SDPA) needs transformers' packed-sample mask: left alone."""
    from internvl_lora.train.speed import packed_rows_without_mask_preparation

    d, _, _ = tiny_items
    model = load_model(d / "model")
    assert not packed_rows_without_mask_preparation(model)
    assert not model.model.language_model._forward_pre_hooks


@pytest.mark.gpu
def test_a_packed_training_step_never_stops_the_host(tiny_items):
    """On a GPU, forward and backward of a packed batch through a LoRA model (frozen base, as trained) queue
    their work without waiting for the GPU (torch's sync debug mode raises at any synchronizing call):
    before, transformers read the image-token count and its packed-sample test back to the host in every
    forward."""
    from internvl_lora.data.collate import trained_positions
    from internvl_lora.internvl.embed import image_tokens_checked_on_the_gpu
    from internvl_lora.train.speed import packed_rows_without_mask_preparation

    from internvl_lora.config import PolicyArgs
    from internvl_lora.lora.policy import apply_policy

    d, _, items = tiny_items
    model = load_model(d / "model", dtype=torch.bfloat16).cuda()
    model.set_attn_implementation({"text_config": register_varlen_attention()})
    model = apply_policy(model, PolicyArgs(dropout=0.05), "qwen2").train()  # frozen base, LoRA on the LLM
    assert packed_rows_without_mask_preparation(model) and image_tokens_checked_on_the_gpu(model)
    batch = PackedCollator()(items)
    batch["trained_positions"] = trained_positions(batch["labels"])  # as `collate.HostSide` adds it
    n = torch.tensor(float((batch["labels"][:, 1:] != -100).sum()))
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    n = n.cuda()
    for step in range(2):  # the first step sets things up (allocator, kernels): only the second is watched
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if step else 0)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):  # the Trainer's bf16 mixed precision
                loss = trained_positions_loss(model, batch, n)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()


def _internvl(text):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    vit = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, image_size=448,
               patch_size=14)
    cfg = InternVLConfig(vision_config=vit, text_config=text, image_token_id=100)
    return InternVLForConditionalGeneration._from_config(cfg, attn_implementation="eager")


_GPT_OSS = dict(model_type="gpt_oss", hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=300, num_local_experts=4, num_experts_per_tok=2,
                sliding_window=8, layer_types=["sliding_attention", "full_attention"])


def test_attention_falls_back_to_eager_on_a_part_without_it():
    """model.attn_implementation=sdpa (the default) on an LLM whose transformers class has no SDPA (gpt_oss,
    InternVL3.5-GPT-OSS): transformers refuses the whole model; the vision tower keeps SDPA, the LLM runs
    eager, and the log says so. Parts that support it are set as before."""
    from internvl_lora.train.speed import set_attention

    model = _internvl(_GPT_OSS)
    with pytest.raises(ValueError):
        model.set_attn_implementation("sdpa")
    notes = set_attention(model, "sdpa")
    assert notes == ["attention: GptOssModel does not support sdpa; text part runs eager attention"]
    assert model.config.text_config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "sdpa"
    qwen = _internvl(dict(model_type="qwen2", hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=300))
    assert set_attention(qwen, "sdpa") == []
    assert qwen.config.text_config._attn_implementation == qwen.config.vision_config._attn_implementation == "sdpa"


def test_packing_is_refused_for_an_llm_with_attention_sinks():
    """The packed attention computes plain causal attention per sample: gpt_oss's learned sinks and sliding
    windows were silently dropped. Refused before anything loads, and in the attention itself."""
    from internvl_lora.errors import UserError
    from internvl_lora.train.speed import check_packing

    with pytest.raises(UserError, match=r"data\.packing=false"):
        check_packing("gpt_oss", True)
    check_packing("gpt_oss", False)
    check_packing("qwen2", True)
    model = _internvl(_GPT_OSS)
    model.set_attn_implementation({"text_config": register_varlen_attention()})
    cu = torch.tensor([0, 12], dtype=torch.int32)
    with pytest.raises(UserError, match="attention sinks and sliding windows of GptOssAttention"):
        model(input_ids=torch.randint(0, 99, (1, 12)), position_ids=torch.arange(12)[None], cu_seq_lens_q=cu,
              cu_seq_lens_k=cu, max_length_q=12, max_length_k=12)
