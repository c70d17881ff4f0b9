"""Training-step throughput of our real training path on InternVL3-shaped models (random weights).

    python bench/train_step_bench.py --sizes 1b,8b --modes packed,padded [--steps 10]

What runs: the model built from a real-shaped config (InternViT-300M + Qwen2.5 LLM of InternVL3-1B /
2B / 8B), our LoRA policy (`lora.apply_policy`: r16 on the LLM, vision and projector frozen), our
collators (`fast.PackedCollator` or `data.dataset.PadCollator`), our `train.InternVLTrainer` driven by
`Trainer.train()` with bf16 and AdamW — only the dataset is synthetic (no tokenizer, no images: ids
and random tiles). Samples follow ../shared/bench/naive_lora_step.py exactly (same RNG, same draws):
1–6 tiles (+ thumbnail when > 1), 16–64 prefix tokens, 16–128 question tokens, 32–512 answer tokens
(the only trained ones), per-device batch 4.

Model FLOPs per step (the naive script's formula, so ratios compare like with like):
  LLM: 4 * N_llm per token (forward 2N + activation gradients 2N; LoRA weights are negligible),
       N_llm = matmul weights incl. lm_head; plus causal attention 3 * 2 * L * d * s^2 per sample;
  ViT (frozen, forward only): tiles * (2 * N_vit * 1025 + 4 * L_v * d_v * 1025^2).
Work we skip (logits of untrained positions, padding) still counts as model FLOPs, as in MFU.
Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformers import InternVLConfig, InternVLForConditionalGeneration, TrainerCallback, TrainingArguments  # noqa: E402

from internvl_lora.callbacks import StepStats  # noqa: E402
# The baseline's shapes, sample draws and FLOP formula, imported so both sides use the very same ones.
from naive_lora_step import IMG_TOKEN, LLM, model_flops, samples  # noqa: E402
from internvl_lora.config import PolicyArgs  # noqa: E402
from internvl_lora.data.dataset import PadCollator  # noqa: E402
from internvl_lora.fast import PackedCollator, register_varlen_attention, trained_positions_loss  # noqa: E402
from internvl_lora.lora import apply_policy  # noqa: E402
from internvl_lora.train import InternVLTrainer  # noqa: E402

VIT_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=448, patch_size=14)
PEAK_TFLOPS = 790.0


class Synthetic(torch.utils.data.Dataset):
    def __init__(self, groups, tile):
        self.items = [s for g in groups for s in g]
        self.tile = tile

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ids, labels, patches = self.items[i]
        g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "pixel_values": torch.randn(patches, 3, self.tile, self.tile, generator=g)}


class FastTrainer(InternVLTrainer):
    """InternVLTrainer with the loss computed on trained positions only (fast.trained_positions_loss)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.stats.add(inputs)
        return trained_positions_loss(model, inputs, num_items_in_batch)


class Timer(TrainerCallback):
    def __init__(self, warmup):
        self.warmup, self.t0, self.steps = warmup, None, 0

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if state.global_step > self.warmup:
            self.steps += 1


def run(size, mode, bs, steps, max_tiles, ckpt, liger, out_dir, warmup=3, dropout=0.05):
    torch.manual_seed(0)
    vit = VIT_TINY if size == "tiny" else {}
    cfg = InternVLConfig(vision_config=vit, text_config=dict(model_type="qwen2", rope_theta=1e6, max_position_embeddings=32768, **LLM[size]),
                         image_token_id=IMG_TOKEN, tie_word_embeddings=LLM[size]["tie_word_embeddings"])
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):
        model = InternVLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa",
                                                              dtype=torch.bfloat16 if cuda else torch.float32)
    packed = mode.startswith("packed")
    if packed:
        model.set_attn_implementation({"text_config": register_varlen_attention()})
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=model.model.language_model)
    model = apply_policy(model, PolicyArgs(dropout=dropout), "qwen2")
    rng = random.Random(0)
    groups = [samples(bs, rng, max_tiles) for _ in range(steps + warmup)]
    data = Synthetic(groups, cfg.vision_config.image_size[0] if isinstance(cfg.vision_config.image_size, (list, tuple)) else cfg.vision_config.image_size)
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=bs, gradient_accumulation_steps=1, learning_rate=4e-5,
        max_steps=steps + warmup, bf16=cuda, use_cpu=not cuda, activation_checkpointing=ckpt > 0,
        # every_n_layers: checkpoint only every ckpt-th decoder layer (1 = all layers).
        activation_checkpointing_kwargs={"use_reentrant": False, "every_n_layers": ckpt} if ckpt else None,
        logging_steps=10**6, save_strategy="no", report_to=[], disable_tqdm=True, remove_unused_columns=False,
        train_sampling_strategy="sequential", dataloader_num_workers=2 if cuda else 0, dataloader_pin_memory=cuda, seed=0,
    )
    stats = StepStats()
    timer = Timer(warmup)
    cls = FastTrainer if mode in ("packed", "padded-fast") else InternVLTrainer
    collator = PackedCollator() if packed else PadCollator(0)
    trainer = cls(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[timer], stats=stats)
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - timer.t0
    timed = groups[warmup:]
    real = sum(len(i) for g in timed for i, _, _ in g)
    flops = sum(model_flops(cfg, g) for g in timed)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return dict(size=size, mode=mode, bs=bs, grad_ckpt=ckpt, liger=liger, lora_dropout=dropout, steps=steps,
                real_tokens_per_s=round(real / dt), samples_per_s=round(bs * steps / dt, 2),
                model_tflops=round(flops / dt / 1e12, 1), pct_of_peak=round(100 * flops / dt / 1e12 / PEAK_TFLOPS, 1),
                peak_gib=round(peak, 1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1b,8b")
    ap.add_argument("--modes", default="packed")
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-tiles", type=int, default=6)
    ap.add_argument("--ckpt", default="1", help="comma list: 0 off, 1 every layer, k every k-th layer")
    ap.add_argument("--liger", default="0", help="comma list of 0/1")
    ap.add_argument("--out", default="/tmp/bench_run")
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (the recipe's 0.05)")
    a = ap.parse_args()
    for s in a.sizes.split(","):
        for m in a.modes.split(","):
            for c in map(int, a.ckpt.split(",")):
                for lg in map(int, a.liger.split(",")):
                    try:
                        r = run(s, m, a.bs, a.steps, a.max_tiles, c, bool(lg), a.out, dropout=a.dropout)
                    except Exception as e:  # one failing configuration must not hide the others
                        r = dict(size=s, mode=m, grad_ckpt=c, liger=lg, error=repr(e)[:400])
                    print(json.dumps(r), flush=True)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
