"""The seed recipe across GPUs on an InternVL3-8B-shaped model (random weights), through our Trainer.

    torchrun --nproc_per_node 2 bench/multi_gpu.py --backend zero1 --steps 40 --accum 2     # 2 GPUs
    python bench/multi_gpu.py --backend none --steps 40 --accum 4                           # 1 GPU, same global batch
    torchrun --nproc_per_node 2 bench/multi_gpu.py --backend zero3 --steps 6 --text-only-rank 1

What runs: `lora.apply_policy` (LoRA r16 on the LLM), `train.InternVLTrainer` with `Trainer.train()`,
`data.dataset.PadCollator`, bf16, lr 4e-5 cosine with 3 % warmup, weight decay 0.05, activation
checkpointing, per-device batch 4. Samples as in bench/train_step_bench.py; with `--text-only-rank R`
every micro-batch that rank R receives is text-only (no tiles), the case that hangs ZeRO-3 when the
vision tower runs on some ranks only. Rank 0 writes one JSON line: per-step losses, tokens/s, peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step_bench import IMG_TOKEN, LLM, samples  # noqa: E402
from transformers import InternVLConfig, InternVLForConditionalGeneration, TrainerCallback, TrainingArguments  # noqa: E402

from internvl_lora.callbacks import StepStats  # noqa: E402
from internvl_lora.config import PolicyArgs  # noqa: E402
from internvl_lora.data.blank_tile import BlankTileCollator  # noqa: E402
from internvl_lora.data.dataset import PadCollator  # noqa: E402
from internvl_lora.lora import apply_policy  # noqa: E402
from internvl_lora.train import InternVLTrainer  # noqa: E402

DS = {
    "zero1": {"zero_optimization": {"stage": 1, "overlap_comm": True, "contiguous_gradients": True,
                                    "reduce_bucket_size": 1e9, "allgather_bucket_size": 1e9}},
    "zero3": {"zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                    "stage3_gather_16bit_weights_on_model_save": True,
                                    "stage3_param_persistence_threshold": 1e7}},
}


class Data(torch.utils.data.Dataset):
    def __init__(self, items, bs, world, text_only_rank, tile):
        self.items, self.bs, self.world, self.text_rank, self.tile = items, bs, world, text_only_rank, tile

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ids, labels, patches = self.items[i]
        # accelerate deals whole micro-batches round robin: micro-batch k goes to rank k % world.
        if self.text_rank is not None and (i // self.bs) % self.world == self.text_rank:
            keep = [k for k, t in enumerate(ids) if t != IMG_TOKEN]
            return {"input_ids": torch.tensor([ids[k] for k in keep]), "labels": torch.tensor([labels[k] for k in keep])}
        g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "pixel_values": torch.randn(patches, 3, self.tile, self.tile, generator=g)}


class Record(TrainerCallback):
    def __init__(self):
        self.losses, self.t0, self.t_end = [], None, None

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == 2 and self.t0 is None:  # time from step 3 on (warm-up excluded)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(round(float(logs["loss"]), 5))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="8b")
    ap.add_argument("--backend", default="none", choices=["none", "ddp", "zero1", "zero3", "fsdp"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--text-only-rank", type=int, default=None)
    ap.add_argument("--out", default="/tmp/mgpu")
    ap.add_argument("--save", action="store_true", help="save the adapter at the end (rank 0 writes)")
    a = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    cfg = InternVLConfig(text_config=dict(model_type="qwen2", rope_theta=1e6, max_position_embeddings=32768, **LLM[a.size]),
                         image_token_id=IMG_TOKEN, tie_word_embeddings=LLM[a.size]["tie_word_embeddings"])
    ds_config = dict(DS[a.backend], bf16={"enabled": "auto"}, train_micro_batch_size_per_gpu="auto",
                     gradient_accumulation_steps="auto", gradient_clipping="auto", train_batch_size="auto") \
        if a.backend in DS else None
    fsdp = dict(fsdp="full_shard auto_wrap", fsdp_config={"transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer", "InternVLVisionLayer"],
                                                        "use_orig_params": True}) if a.backend == "fsdp" else {}
    args = TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=a.bs, gradient_accumulation_steps=a.accum,
        learning_rate=4e-5, lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.05, max_steps=a.steps,
        bf16=cuda, use_cpu=not cuda, activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, remove_unused_columns=False,
        train_sampling_strategy="sequential", dataloader_num_workers=2 if cuda else 0, seed=0, deepspeed=ds_config,
        ddp_find_unused_parameters=False, **fsdp,
    )
    vit = {} if a.size != "tiny" else dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    cfg.vision_config = type(cfg.vision_config)(**{**cfg.vision_config.to_dict(), **vit})
    # Sharded backends partition weights from the CPU; the others build straight on their GPU.
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda and a.backend in ("none", "ddp", "zero1") else "cpu"
    with torch.device(device):
        model = InternVLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa",
                                                              dtype=torch.bfloat16 if cuda else torch.float32)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    model = apply_policy(model, PolicyArgs(), "qwen2")
    rng = random.Random(0)
    global_batch = a.bs * a.accum * world
    items = [s for _ in range(a.steps) for s in samples(global_batch, rng, 6)]
    data = Data(items, a.bs, world, a.text_only_rank, 448)
    rec = Record()
    # Text-only micro-batches get a blank tile (data/blank_tile.py): same module order on every rank.
    collator = BlankTileCollator(PadCollator(0), IMG_TOKEN, 256, 448)
    trainer = InternVLTrainer(model=model, args=args, train_dataset=data, data_collator=collator,
                              callbacks=[rec], stats=StepStats())
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - rec.t0
    timed_tokens = sum(len(ids) for ids, _, _ in items[2 * global_batch:])
    if a.save:
        trainer.save_model(os.path.join(a.out, "adapter"))
    if rank == 0:
        print(json.dumps({"backend": a.backend, "world": world, "per_device": a.bs, "accum": a.accum,
                          "global_batch": global_batch, "steps": a.steps, "text_only_rank": a.text_only_rank,
                          "tokens_per_s": round(timed_tokens / dt), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else 0,
                          "losses": rec.losses}), flush=True)


if __name__ == "__main__":
    main()
