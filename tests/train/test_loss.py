"""The training loss (`internvl_lora.train.loss`): weights, trained positions only, chunked logits."""

from __future__ import annotations

import pytest
import torch

from internvl_lora.data.collate import PackedCollator, PadCollator
from internvl_lora.internvl.checkpoint import load_model
from internvl_lora.train.loss import trained_positions_loss
from internvl_lora.train.speed import register_varlen_attention


def test_loss_weights_padded_and_packed():
    from internvl_lora.train.loss import loss_weights

    I = -100
    rows = torch.tensor([[I, 5, 6, 7, 8], [I, I, I, 9, I]])
    assert loss_weights(rows, reduction="token").tolist() == [[0, 1, 1, 1, 1], [0, 0, 0, 1, 0]]
    w = loss_weights(rows, reduction="sample")
    assert torch.allclose(w, torch.tensor([[0, .25, .25, .25, .25], [0, 0, 0, 1, 0]]))
    w = loss_weights(rows, reduction="square")
    assert torch.allclose(w, torch.tensor([[0, .5, .5, .5, .5], [0, 0, 0, 1, 0]]))
    packed = torch.tensor([[I, 5, 6, 7, 8, I, I, I, 9, I, I, I]])  # three samples: 5 + 5 + 2 tokens
    cu = torch.tensor([0, 5, 10, 12], dtype=torch.int32)
    w = loss_weights(packed, cu, "square")
    assert torch.allclose(w, torch.tensor([[0, .5, .5, .5, .5, 0, 0, 0, 1, 0, 0, 0]]))


def test_square_loss_packed_equals_padded_and_reference(tiny_items):
    """square: sum over samples of (1/sqrt n) * sum CE, over sum of n/sqrt n -- packed == padded == by hand."""
    d, tok, items = tiny_items
    items = [dict(it) for it in items]
    for i, it in enumerate(items):  # the demo answers all have the same length: train i more tokens in sample i
        lab = it["labels"].clone()
        first = int((lab != -100).nonzero()[0])
        lab[first - i:first] = it["input_ids"][first - i:first]
        it["labels"] = lab
    model = load_model(d / "model").eval()
    padded = PadCollator(tok.pad_token_id)(items)
    with torch.no_grad():
        out = model(**padded, use_cache=False)
        num, den = 0.0, 0.0
        for row in range(len(items)):
            lab = padded["labels"][row, 1:]
            ce = torch.nn.functional.cross_entropy(out.logits[row, :-1].float(), lab, ignore_index=-100, reduction="sum")
            n = (lab != -100).sum().item()
            if n:
                num, den = num + ce.item() / n ** 0.5, den + n ** 0.5
        by_hand = num / den
        a = trained_positions_loss(model, padded, None, "square").item()
        model.set_attn_implementation({"text_config": register_varlen_attention()})
        b = trained_positions_loss(model, PackedCollator()(items), None, "square").item()
    assert abs(a - by_hand) < 1e-5 * abs(by_hand) and abs(b - by_hand) < 1e-5 * abs(by_hand), (a, b, by_hand)
    token = trained_positions_loss(model, PackedCollator()(items), None, "token").item()
    assert abs(token - by_hand) > 1e-4  # the weighting does change the loss on these samples


@pytest.mark.slow
def test_square_loss_is_normalised_over_the_global_batch(demo_folder, tmp_path, monkeypatch, loss_curve):
    """square: one micro-batch of 4 and two accumulated micro-batches of 2 (the same samples per step, by
    the seeded sampler) give the same loss curve: sum(w * CE) / sum(w) over the whole optimizer step."""
    import json

    cfg_path = demo_folder(16, 2, copy_to=tmp_path / "d") / "train.yaml"
    train_jsonl = tmp_path / "d" / "data" / "train.jsonl"
    lines = train_jsonl.read_text().splitlines()
    for i in range(8):  # answers of different lengths, so that 1/sqrt(n) differs between samples
        answer = " ".join(["red", "green", "blue", "yellow"] * (i + 1))
        lines.append(json.dumps({"id": 5000 + i, "conversations": [{"from": "human", "value": f"List {i + 1}."},
                                                                  {"from": "gpt", "value": answer}]}))
    train_jsonl.write_text("\n".join(lines) + "\n")
    import internvl_lora.train.trainer as train_mod
    from internvl_lora.train.loss import loss_weights

    calls = []

    def spy(model, inputs, num_items_in_batch=None, reduction="token"):
        w = loss_weights(inputs["labels"], inputs.get("cu_seq_lens_q"), reduction).sum().item()
        calls.append((w, float(num_items_in_batch)))
        return trained_positions_loss(model, inputs, num_items_in_batch, reduction)

    monkeypatch.setattr(train_mod, "trained_positions_loss", spy)
    common = ["train.loss_reduction=square", "policy.dropout=0.0", "train.max_steps=3"]
    one = loss_curve(cfg_path, tmp_path / "one", common + ["train.per_device_batch_size=4", "train.grad_accum=1"])
    assert len(calls) == 3 and all(abs(w - n) < 1e-5 for w, n in calls), calls  # the normaliser is sum(w)
    calls.clear()
    two = loss_curve(cfg_path, tmp_path / "two", common + ["train.per_device_batch_size=2", "train.grad_accum=2"])
    assert len(calls) == 6
    for (w1, n1), (w2, n2) in zip(calls[0::2], calls[1::2]):  # both micro-batches divide by the step's sum(w)
        assert abs(n1 - n2) < 1e-6 and abs(n1 - (w1 + w2)) < 1e-5, calls
    monkeypatch.undo()
    token = loss_curve(cfg_path, tmp_path / "token", ["policy.dropout=0.0", "train.max_steps=3",
                                                  "train.per_device_batch_size=4", "train.grad_accum=1"])
    assert len(one) == 3
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one, two)
    assert any(abs(a - b) > 1e-4 for a, b in zip(one, token))  # the weighting is in effect


@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_linear_cross_entropy_equals_full_logits(weighted):
    """Loss and gradients (hidden states and a trained output weight) equal the full-logits computation,
    over several chunks, with ignored targets and per-position weights."""
    from internvl_lora.train.loss import _ChunkedLinearCrossEntropy

    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    t[[3, 10, 11]] = -100
    weights = torch.rand(37) if weighted else None
    # 50 * 8 elements per chunk -> 8 positions per chunk, 5 chunks (the last one shorter)
    loss = _ChunkedLinearCrossEntropy.apply(h, w, t, weights, 50 * 8)
    (loss * 0.7).backward()
    h2, w2 = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(h2 @ w2.t(), t, ignore_index=-100, reduction="none")
    ref = (ce * weights).sum() if weighted else ce.sum()
    (ref * 0.7).backward()
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(h.grad, h2.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(w.grad, w2.grad, rtol=1e-5, atol=1e-6)
    assert h.grad[3].abs().sum() == 0  # an ignored position gets no gradient


@pytest.mark.parametrize("trained_w", [False, True])
def test_chunked_loss_split_at_the_aligned_vocabulary_equals_full_logits(monkeypatch, trained_w):
    """The GPU layout -- logits and gradient in a buffer with rows padded to 64, the matmuls over the
    vocabulary's last multiple of 64 and the few rows after it separately -- forced on the CPU: loss and
    gradients equal the full-logits computation (a vocabulary of 203 = 192 + 11, several chunks)."""
    from internvl_lora.train import loss as loss_mod

    calls = []
    monkeypatch.setattr(loss_mod, "_aligned_rows", lambda vocab, hidden: calls.append(vocab) or vocab // 64 * 64)
    torch.manual_seed(0)
    h = torch.randn(29, 16, requires_grad=True)
    w = torch.randn(203, 16, requires_grad=trained_w)
    t = torch.randint(0, 203, (29,))
    t[[0, 7]] = -100
    t[1] = 200  # a target among the rows after the aligned part
    weights = torch.rand(29)
    loss = loss_mod._ChunkedLinearCrossEntropy.apply(h, w, t, weights, 203 * 8)
    (loss * 0.5).backward()
    assert calls == [203]
    h2, w2 = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(trained_w)
    ce = torch.nn.functional.cross_entropy(h2 @ w2.t(), t, ignore_index=-100, reduction="none")
    ((ce * weights).sum() * 0.5).backward()
    assert torch.allclose(loss * 0.5, (ce * weights).sum() * 0.5, rtol=1e-5, atol=1e-5)
    assert torch.allclose(h.grad, h2.grad, rtol=1e-5, atol=1e-6)
    if trained_w:
        assert torch.allclose(w.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_aligned_rows_only_on_a_gpu_for_an_unaligned_vocabulary():
    from internvl_lora.train.loss import _aligned_rows

    cpu = torch.zeros(1)
    assert _aligned_rows(151674, cpu) == 151674  # the CPU keeps one matmul

    class Cuda:
        is_cuda = True

    assert _aligned_rows(151674, Cuda()) == 151616
    assert _aligned_rows(151680, Cuda()) == 151680  # already a multiple of 64
    assert _aligned_rows(50, Cuda()) == 50  # below one block: nothing to split


def test_chunked_cross_entropy_computes_in_the_output_layers_dtype():
    """The Trainer's mixed precision hands the loss float32 hidden states (accelerate converts a model's
    outputs to float32) outside autocast, with a bfloat16 output layer: the chunks are computed in bfloat16
    as the layer itself would, not in float32 on a float32 copy of the weight (slow and 2 GiB at 8B)."""
    from internvl_lora.train.loss import _ChunkedLinearCrossEntropy

    torch.manual_seed(0)
    hb = torch.randn(23, 32).bfloat16()
    w = torch.randn(70, 32).bfloat16()
    t = torch.randint(0, 70, (23,))
    h = hb.float().requires_grad_(True)  # bf16 values, widened to float32 like accelerate's outputs
    loss = _ChunkedLinearCrossEntropy.apply(h, w, t, None, 70 * 8)
    loss.backward()
    assert h.grad.dtype == torch.float32
    hr = hb.clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy((hr @ w.t()).float(), t, reduction="sum")
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-6, atol=1e-6), (loss, ref)
    assert torch.allclose(h.grad, hr.grad.float(), rtol=1e-2, atol=1e-2)
    full = torch.nn.functional.cross_entropy(h.detach() @ w.float().t(), t, reduction="sum")
    assert not torch.allclose(loss, full, rtol=1e-6, atol=1e-6)  # float32 logits would give another number


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["token", "square"])
def test_chunked_loss_equals_logits_loss_on_the_model(tiny_items, reduction):
    """trained_positions_loss with the output layer deferred (train.chunked_loss) gives the loss and the
    gradients of the logits path, packed, on the tiny InternVL; the output layer's weight is unchanged."""
    from internvl_lora.train.loss import DeferredHead, chunk_output_layer

    d, tok, items = tiny_items
    results = []
    for chunked in (False, True):
        model = load_model(d / "model")
        model.train()
        model.set_attn_implementation({"text_config": register_varlen_attention()})
        if chunked:
            assert chunk_output_layer(model)
            assert type(model.get_output_embeddings()) is DeferredHead
            model.lm_head.weight.requires_grad_(True)  # exercises the output weight's gradient too
        batch = PackedCollator()(items)
        loss = trained_positions_loss(model, batch, None, reduction)
        loss.backward()
        results.append((loss.detach(), model.model.language_model.layers[0].self_attn.q_proj.weight.grad.clone(),
                        model.lm_head.weight.grad.clone() if chunked else None))
        if chunked:  # outside the loss the output layer returns logits as before
            with torch.no_grad():
                out = model(**{k: v for k, v in PadCollator(tok.pad_token_id)(items[:2]).items()}, use_cache=False)
            assert out.logits.shape[-1] == model.config.text_config.vocab_size
    (l0, g0, _), (l1, g1, gw) = results
    assert torch.allclose(l0, l1, rtol=1e-5, atol=1e-6), (l0, l1)
    assert torch.allclose(g0, g1, rtol=1e-4, atol=1e-6)
    assert gw is not None and gw.abs().sum() > 0


@pytest.mark.slow
def test_chunked_loss_under_autocast_matches_logits_loss(tiny_items):
    """bfloat16 autocast (the Trainer's bf16 mode) on a float32 model: the chunk's logits are formed in
    bfloat16 like the output layer's, so both paths agree to bf16 rounding."""
    from internvl_lora.train.loss import chunk_output_layer

    d, tok, items = tiny_items
    losses = []
    for chunked in (False, True):
        model = load_model(d / "model").eval()
        model.set_attn_implementation({"text_config": register_varlen_attention()})
        if chunked:
            chunk_output_layer(model)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(trained_positions_loss(model, PackedCollator()(items), None).float())
    assert torch.allclose(losses[0], losses[1], rtol=1e-3, atol=1e-3), losses


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chunked_loss_on_cuda_in_bf16_matches_logits_loss(tiny_items):
    """On the GPU with a bf16 model under bf16 autocast (the Trainer's setting), fused LoRA layers on:
    the chunked loss and its gradients agree with the logits path to bf16 rounding."""
    from internvl_lora.config import PolicyArgs
    from internvl_lora.lora.fused import fuse_lora_layers
    from internvl_lora.train.loss import chunk_output_layer
    from internvl_lora.lora.policy import apply_policy

    d, tok, items = tiny_items
    results = []
    for chunked in (False, True):
        torch.manual_seed(0)
        model = apply_policy(load_model(d / "model", dtype=torch.bfloat16), PolicyArgs(dropout=0.0), "qwen2").cuda()
        assert fuse_lora_layers(model) > 0
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        model.train()
        model.set_attn_implementation({"text_config": register_varlen_attention()})
        if chunked:
            assert chunk_output_layer(model)
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in PackedCollator()(items).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = trained_positions_loss(model, batch, None)
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for n, p in model.named_parameters() if p.grad is not None])
        results.append((loss.float().item(), grads))
    (l0, g0), (l1, g1) = results
    assert abs(l0 - l1) <= 1e-2 * abs(l0), (l0, l1)
    assert torch.nn.functional.cosine_similarity(g0, g1, dim=0) > 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chunked_loss_on_cuda_at_the_qwen2_vocabulary_matches_full_logits():
    """On the GPU at InternVL's vocabulary (151,674 rows: split at 151,616 for the matmuls), bf16: loss and
    hidden-state gradient agree with the full logits to bf16 rounding, over chunks with a short last one."""
    from internvl_lora.train.loss import _ChunkedLinearCrossEntropy

    torch.manual_seed(0)
    vocab, width, n = 151674, 256, 500
    h = (torch.randn(n, width, device="cuda") * 0.5).bfloat16().requires_grad_(True)
    w = (torch.randn(vocab, width, device="cuda") * 0.05).bfloat16()
    t = torch.randint(0, vocab, (n,), device="cuda")
    t[:5] = torch.arange(vocab - 5, vocab, device="cuda")  # targets among the last rows
    t[5] = -100
    loss = _ChunkedLinearCrossEntropy.apply(h, w, t, None)  # 221 positions per chunk: 221, 221, 58
    loss.backward()
    hr = h.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy((hr @ w.t()).float(), t, ignore_index=-100, reduction="sum")
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-4, atol=1e-2), (loss, ref)
    assert torch.allclose(h.grad.float(), hr.grad.float(), rtol=2e-2, atol=2e-3)
