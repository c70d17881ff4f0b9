"""The seed recipe across GPUs on an InternVL3-8B-shaped model (random weights), through our Trainer.

    torchrun --nproc_per_node 2 bench/multi_gpu.py --backend zero1 --steps 40 --accum 2     # 2 GPUs
    python bench/multi_gpu.py --backend none --steps 40 --accum 4                           # 1 GPU, same global batch
    torchrun --nproc_per_node 2 bench/multi_gpu.py --backend zero3 --steps 6 --text-only-rank 1
    torchrun --nproc_per_node 2 bench/multi_gpu.py --size 1b --backend zero3 --steps 3 --accum 2 --text-only-rank 1 \
        --merge .bench_tokenizer                                                            # + save, merge, parity

What runs: `lora.policy.apply_policy` (LoRA r16 on the LLM), `train.trainer.InternVLTrainer` with `Trainer.train()`,
`data.collate.PadCollator`, bf16, lr 4e-5 cosine with 3 % warmup, weight decay 0.05, activation
checkpointing, per-device batch 4. Samples as in bench/train_step_bench.py; with `--text-only-rank R`
every micro-batch that rank R receives is text-only (no tiles), the case that hangs ZeRO-3 when the
vision tower runs on some ranks only. Rank 0 writes one JSON line: per-step losses, tokens/s, peak memory.
Activation checkpointing is reentrant under ZeRO-3 (which re-partitions weights between forward and
recomputation, something non-reentrant checkpointing rejects), non-reentrant otherwise, as in
`train.training_arguments`.

`--save` writes the adapter to OUT/adapter (`Trainer.save_model`, collective under ZeRO-3). `--merge TOKENIZER_DIR`
(a folder with an InternVL tokenizer: vocab.json, merges.txt, tokenizer_config.json, ...) also saves and
merges: the model takes the tokenizer's <IMG_CONTEXT> id (samples remapped) and a vocabulary that covers it;
before LoRA is applied rank 0 writes the random base as a -hf checkpoint to OUT/base (weights, tokenizer,
preprocessor_config.json; gathered from all ranks under ZeRO-3); after training rank 0 runs
`merge.merge(OUT/adapter, OUT/merged, base=OUT/base)` with its parity check (adapter vs merged logits,
merged != base, reload == memory) and adds its figures to the JSON line ("merge", or "merge_error").
On a machine without a GPU, torchrun runs DDP over gloo (no DeepSpeed / FSDP there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from naive_lora_step import TOK_PER_TILE  # noqa: E402
from train_step_bench import IMG_TOKEN, LLM, samples  # noqa: E402
from transformers import InternVLConfig, InternVLForConditionalGeneration, TrainerCallback, TrainingArguments  # noqa: E402

from internvl_lora.train.callbacks import StepStats  # noqa: E402
from internvl_lora.config import PolicyArgs  # noqa: E402
from internvl_lora.data.collate import BlankTileCollator, PadCollator  # noqa: E402
from internvl_lora.internvl.checkpoint import inspect_checkpoint  # noqa: E402
from internvl_lora.internvl.constants import IMG_CONTEXT_TOKEN  # noqa: E402
from internvl_lora.internvl.format.config_map import preprocessor_config  # noqa: E402
from internvl_lora.lora.policy import apply_policy  # noqa: E402
from internvl_lora.train.trainer import InternVLTrainer  # noqa: E402

DS = {
    "zero1": {"zero_optimization": {"stage": 1, "overlap_comm": True, "contiguous_gradients": True,
                                    "reduce_bucket_size": 1e9, "allgather_bucket_size": 1e9}},
    "zero3": {"zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                    "stage3_gather_16bit_weights_on_model_save": True,
                                    "stage3_param_persistence_threshold": 1e7}},
}


MAX_DYNAMIC_PATCH = 6  # tiles per image in the samples (and in the saved base's preprocessor config)


class Data(torch.utils.data.Dataset):
    def __init__(self, items, bs, world, text_only_rank, tile, image_token_id=IMG_TOKEN):
        self.items, self.bs, self.world, self.text_rank, self.tile = items, bs, world, text_only_rank, tile
        self.image_token_id = image_token_id

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ids, labels, patches = self.items[i]
        # accelerate deals whole micro-batches round robin: micro-batch k goes to rank k % world.
        if self.text_rank is not None and (i // self.bs) % self.world == self.text_rank:
            keep = [k for k, t in enumerate(ids) if t != IMG_TOKEN]
            return {"input_ids": torch.tensor([ids[k] for k in keep]), "labels": torch.tensor([labels[k] for k in keep])}
        if self.image_token_id != IMG_TOKEN:  # the tokenizer's <IMG_CONTEXT> (--merge); labels there are -100
            ids = [self.image_token_id if t == IMG_TOKEN else t for t in ids]
        g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "pixel_values": torch.randn(patches, 3, self.tile, self.tile, generator=g)}


def load_tokenizer(path):
    """An InternVL tokenizer from a folder of tokenizer files only (no config.json, so not
    `checkpoint.load_tokenizer`, which detects the checkpoint format first)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN) in (None, tokenizer.unk_token_id):
        raise SystemExit(f"--merge {path}: the tokenizer has no {IMG_CONTEXT_TOKEN} token")
    return tokenizer


def tile_size(model) -> int:
    size = model.config.vision_config.image_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def save_base(model, tokenizer, out: Path, rank: int) -> None:
    """The random base as a -hf checkpoint (what `merge` takes as --base), written by rank 0, before LoRA.
    Under ZeRO-3 the model is already partitioned (transformers builds it under zero.Init once the
    TrainingArguments hold a ZeRO-3 config): every rank joins the gather, rank 0 writes."""
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    gather = contextlib.nullcontext()
    if zero3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    with gather:
        if rank != 0:
            return
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    settings = preprocessor_config({"force_image_size": tile_size(model), "max_dynamic_patch": MAX_DYNAMIC_PATCH,
                                    "min_dynamic_patch": 1, "dynamic_image_size": True})
    (out / "preprocessor_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    info = inspect_checkpoint(out)
    expect = dict(format="hf", tile_size=tile_size(model), tokens_per_tile=TOK_PER_TILE, max_dynamic_patch=MAX_DYNAMIC_PATCH)
    got = {k: getattr(info, k) for k in expect}
    if got != expect:
        raise SystemExit(f"{out}: inspect_checkpoint reads {got}, expected {expect}")


MERGE_KEYS = ("ok", "dtype", "lora_modules", "zero_lora_b_modules", "probe_tokens", "max_abs_logit",
              "max_abs_diff_adapter_vs_merged", "max_abs_diff_merged_vs_base", "max_abs_diff_reloaded_vs_merged",
              "top1_agreement_adapter_vs_merged", "tolerance", "problems", "warning", "seconds")


def run_merge(out: Path) -> dict:
    """merge.merge(OUT/adapter -> OUT/merged, base OUT/base); the report's key figures, or the error."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from internvl_lora.merge import merge

    # The TrainingArguments' ZeRO-3 config stays registered while they live: from_pretrained would then
    # build the merge's models under zero.Init, partitioned over ranks that have left. Rank 0 alone merges.
    unset_hf_deepspeed_config()
    t0 = time.perf_counter()
    try:
        report = merge(out / "adapter", out / "merged", base=out / "base", overwrite=True)
    except Exception as e:  # noqa: BLE001 - reported in the JSON line, whatever it is
        return {"merge_error": f"{type(e).__name__}: {e}", "merge_seconds": round(time.perf_counter() - t0, 1)}
    return {"merge": {k: report[k] for k in MERGE_KEYS if k in report}}


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
    ap.add_argument("--out", default="runs/bench_multi_gpu", help="output folder (relative: to the current folder)")
    ap.add_argument("--save", action="store_true", help="save the adapter at the end (OUT/adapter)")
    ap.add_argument("--merge", metavar="TOKENIZER_DIR", default=None,
                    help="also save the base (OUT/base) and merge the adapter into OUT/merged, with the parity check; "
                         "TOKENIZER_DIR holds an InternVL tokenizer (implies --save)")
    a = ap.parse_args()
    a.save = a.save or a.merge is not None
    out = Path(a.out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    text = dict(model_type="qwen2", rope_theta=1e6, max_position_embeddings=32768, **LLM[a.size])
    image_token_id, tokenizer = IMG_TOKEN, None
    if a.merge:  # the merge's probe is a real prompt with an image: the model needs the tokenizer's ids
        tokenizer = load_tokenizer(a.merge)
        image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        text["vocab_size"] = max(text["vocab_size"], len(tokenizer))
    cfg = InternVLConfig(text_config=text, image_token_id=image_token_id, tie_word_embeddings=LLM[a.size]["tie_word_embeddings"])
    ds_config = dict(DS[a.backend], bf16={"enabled": "auto"}, train_micro_batch_size_per_gpu="auto",
                     gradient_accumulation_steps="auto", gradient_clipping="auto", train_batch_size="auto") \
        if a.backend in DS else None
    fsdp = dict(fsdp="full_shard auto_wrap", fsdp_config={"transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer", "InternVLVisionLayer"],
                                                        "use_orig_params": True}) if a.backend == "fsdp" else {}
    args = TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=a.bs, gradient_accumulation_steps=a.accum,
        learning_rate=4e-5, lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.05, max_steps=a.steps,
        # ZeRO-3 releases partitioned weights between forward and recomputation, which non-reentrant
        # checkpointing rejects ("Recomputed values ... have different metadata"): as train.training_arguments.
        bf16=cuda, use_cpu=not cuda, activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": a.backend == "zero3"},
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, remove_unused_columns=False,
        train_sampling_strategy="sequential", dataloader_num_workers=2 if cuda else 0, seed=0, deepspeed=ds_config,
        ddp_find_unused_parameters=False, **fsdp,
        # torchrun on a machine without a GPU: DDP over gloo (as train.training_arguments).
        **({"ddp_backend": "gloo"} if world > 1 and not cuda else {}),
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
    tile = tile_size(model)
    if a.merge:
        save_base(model, tokenizer, out / "base", rank)
    model = apply_policy(model, PolicyArgs(), "qwen2")
    rng = random.Random(0)
    global_batch = a.bs * a.accum * world
    items = [s for _ in range(a.steps) for s in samples(global_batch, rng, 6)]
    data = Data(items, a.bs, world, a.text_only_rank, tile, image_token_id)
    rec = Record()
    # Text-only micro-batches get a blank tile (data/collate.py BlankTileCollator): same module order on every rank.
    collator = BlankTileCollator(PadCollator(0), image_token_id, TOK_PER_TILE, tile)
    trainer = InternVLTrainer(model=model, args=args, train_dataset=data, data_collator=collator,
                              callbacks=[rec], stats=StepStats())
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - rec.t0 if rec.t0 is not None else None  # None with fewer than 3 steps
    timed_tokens = sum(len(ids) for ids, _, _ in items[2 * global_batch:])
    if a.save:
        trainer.save_model(str(out / "adapter"))  # every rank: a collective under ZeRO-3 / FSDP
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else 0
    if rank != 0:
        return  # only rank 0 merges; the others exit normally
    result = {"backend": a.backend, "world": world, "per_device": a.bs, "accum": a.accum,
              "global_batch": global_batch, "steps": a.steps, "text_only_rank": a.text_only_rank,
              "tokens_per_s": round(timed_tokens / dt) if dt else None, "peak_gib": peak, "losses": rec.losses}
    if a.merge:
        del trainer, model, args
        result.update(run_merge(out))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
