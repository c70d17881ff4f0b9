"""train.memory: the activation plan of train.checkpoint_layers=auto."""

from __future__ import annotations

import pytest
import torch

from internvl_lora.train.memory import activation_bytes, plan_checkpointed_layers, reserve_bytes

GIB = 2**30


def test_the_plan_recomputes_the_fewest_layers_that_fit():
    kept, hidden = 200_000.0, 7168.0  # bytes per token: an 8B-shaped layer, its bf16 input
    # short micro-batches: nothing recomputed
    plan = plan_checkpointed_layers(28, 4096, kept, hidden, budget=40 * GIB)
    assert plan.checkpointed == 0 and plan.fits and plan.share == 0
    # longer ones: some layers, and one fewer would not fit
    plan = plan_checkpointed_layers(28, 16384, kept, hidden, budget=40 * GIB)
    assert 0 < plan.checkpointed < 28 and plan.fits
    assert activation_bytes(28, plan.checkpointed - 1, 16384, kept, hidden) > 40 * GIB
    assert plan.share == plan.checkpointed / 28
    # nothing fits: every layer, flagged
    plan = plan_checkpointed_layers(28, 10**6, kept, hidden, budget=40 * GIB)
    assert plan.checkpointed == 28 and not plan.fits
    assert "28 of 28 LLM decoder layers recomputed" in plan.describe()


def test_recomputing_a_layer_saves_its_activations_but_the_backward_holds_one_layer():
    kept, hidden, t = 1000.0, 10.0, 100
    assert activation_bytes(4, 0, t, kept, hidden) == t * (4 * kept + 4 * hidden)
    assert activation_bytes(4, 4, t, kept, hidden) == t * (4 * hidden + kept + 4 * hidden)
    assert activation_bytes(4, 2, t, kept, hidden) < activation_bytes(4, 1, t, kept, hidden)


def test_reserve_covers_the_optimizer_state_and_a_margin():
    assert reserve_bytes(80 * GIB, 10**9) == 3 * 10**9 + 8 * GIB
    assert reserve_bytes(24 * GIB, 0) == 4 * GIB


def test_auto_recomputes_every_layer_off_a_gpu(demo_folder, tmp_path):
    """On the CPU there is no free-memory figure to plan with: `auto` keeps checkpointing on every layer."""
    from transformers import TrainingArguments

    from internvl_lora.config import load_config
    from internvl_lora.internvl.checkpoint import load_model
    from internvl_lora.lora.policy import apply_policy
    from internvl_lora.train.speed import decoder_layers
    from internvl_lora.train.trainer import _CheckpointShare

    d = demo_folder(4, 2, copy_to=tmp_path / "demo")
    cfg = load_config(d / "train.yaml")
    model = apply_policy(load_model(d / "model", dtype=torch.float32), cfg.policy, "qwen2")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    share = _CheckpointShare(model, "auto", tokens=4096)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), activation_checkpointing=True, use_cpu=True,
                             report_to="none")
    share.on_train_begin(args, None, None)
    assert share.plan is None
    assert all(layer.gradient_checkpointing for layer in decoder_layers(model))


@pytest.mark.gpu
def test_measured_bytes_per_token_predict_the_stack_of_layers():
    """On a GPU: the per-token bytes of one layer, measured by the probe, times the layers and tokens,
    predict what a forward with gradients through the whole decoder stack keeps, both under the step's
    autocast: within 3 % below and 25 % above (H100: 0.1 % below, 889.7 MiB predicted against 890.7 measured;
    what is not per token -- the rotary tables, the allocator's rounding -- falls to the planner's reserve,
    `reserve_bytes`, at least 4 GiB)."""
    from transformers import Qwen2Config, Qwen2Model

    from internvl_lora.train.memory import layer_bytes_per_token, training_autocast

    cfg = Qwen2Config(hidden_size=1024, intermediate_size=4096, num_hidden_layers=6, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=1000)
    model = Qwen2Model(cfg).to("cuda", torch.bfloat16).train()
    kept = layer_bytes_per_token(model.layers[0], model.rotary_emb, cfg.hidden_size, torch.bfloat16, "cuda")
    t = 4096
    x = torch.randn(1, t, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with training_autocast(x):
        out = model(inputs_embeds=x).last_hidden_state
    torch.cuda.synchronize()
    measured = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
    predicted = kept * t * cfg.num_hidden_layers
    print(f"kept per token per layer {kept:.0f} B; stack: predicted {predicted / 2**20:.1f} MiB, measured "
          f"{measured / 2**20:.1f} MiB")
    assert 0.97 * measured <= predicted <= 1.25 * measured, (predicted, measured)


def test_the_probe_runs_the_layer_under_the_training_steps_autocast(monkeypatch):
    """The probe measures the path a step takes: under the Trainer's bf16 autocast (where the fused LoRA
    layers run PEFT's float32 adapters). Outside it, it measured PEFT's own forward and its float32 copies
    (372 KiB per token and layer at the 8B shape). CUDA's memory counters are stood in for on the CPU."""
    from transformers import Qwen2Config, Qwen2Model

    from internvl_lora.train import memory

    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    model = Qwen2Model(cfg).to(torch.bfloat16)
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x, **kw):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return model.layers[0](x, **kw)

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    memory.layer_bytes_per_token(Probe(), model.rotary_emb, cfg.hidden_size, torch.bfloat16, "cpu", tokens=(8, 24))
    assert seen == [(True, torch.bfloat16)] * 4
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.gpu
def test_the_probe_of_a_fused_lora_layer_bounds_the_stack_it_plans_for(fast_path_model):
    """On a GPU, with our training path (fused LoRA layers with PEFT's float32 adapters, Liger, packed
    attention, bf16 autocast): the probe's bytes per token times the layers predict what the whole decoder
    stack keeps for its backward, within 3 % below and 25 % above (H100, two runs: 13 % above, 1,636.5
    MiB against 1,443.7; 1 % below, 1,429.5 against 1,444.5; the planner's reserve covers a few percent).
    Outside autocast the probe read the memory of PEFT's own forward instead (2.7x at the 8B shape)."""
    from internvl_lora.train.memory import layer_bytes_per_token, layer_inputs, training_autocast

    model, decoder = fast_path_model(layers=6)
    kept = layer_bytes_per_token(decoder.layers[0], decoder.rotary_emb, 896, torch.bfloat16, "cuda")
    n = 8192
    x, kw = layer_inputs(decoder, n, torch.bfloat16, "cuda", requires_grad=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with training_autocast(x):
        h = x
        for layer in decoder.layers:
            h = layer(h, attention_mask=None, **kw)
            h = h[0] if isinstance(h, tuple) else h
    torch.cuda.synchronize()
    measured = torch.cuda.memory_allocated() - before - h.numel() * h.element_size()
    predicted = kept * n * len(decoder.layers)
    print(f"kept per token per layer {kept / 1024:.1f} KiB; stack: predicted {predicted / 2**20:.1f} MiB, "
          f"measured {measured / 2**20:.1f} MiB")
    assert 0.97 * measured <= predicted <= 1.25 * measured, (predicted, measured)
