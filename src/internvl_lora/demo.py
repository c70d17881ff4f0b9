"""The embedded default: the whole workflow on a tiny InternVL and a synthetic dataset, on a CPU.

    internvl-lora demo [--out demo_out]
    internvl-lora demo --prepare-only DIR      # only write the model, the data and DIR/train.yaml

Steps, through the same functions the CLI commands call:
  0. build a tiny random InternVL checkpoint (-hf format) and a synthetic coloured-shapes dataset
     (train + held-out, one- and two-image samples, a few text-only ones; meta files);
  1-4. LoRA training on the LLM (vision and projector frozen), adapter-only checkpoints, after the data
     check that training runs first (its report is printed once);
  5. merge with the parity check;  6. validate base vs merged on the held-out split, and again with
     every image blanked (accuracy must fall to chance: the answers come from the images).
Writes OUT/summary.json and OUT/validation/report.html.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from .data.synthetic import COLORS, make_dataset, vocabulary
from .internvl.tiny import build_tiny_checkpoint

CHANCE = 1 / len(COLORS)

# The demo's training recipe: the seed recipe's shape (LoRA r16 on the LLM, cosine, warmup) with a
# learning rate and length suited to a random tiny model on a CPU.
DEMO_TRAIN = {
    "per_device_batch_size": 8, "grad_accum": 1, "lr": 3.0e-3, "lr_scheduler": "cosine", "warmup_ratio": 0.05,
    "weight_decay": 0.0, "epochs": 4, "gradient_checkpointing": False, "logging_steps": 25, "save_steps": 500,
    "save_total_limit": 1, "report_to": ["tensorboard"], "seed": 0, "group_by_length": True,
}


def prepare(out: str | Path, n_train: int = 1600, n_heldout: int = 100) -> Path:
    """Write the tiny model, the dataset and a ready training config; return the config path."""
    out = Path(out).resolve()
    model = build_tiny_checkpoint(out / "model", vocabulary())
    data = make_dataset(out / "data", n_train=n_train, n_heldout=n_heldout)
    config = {
        "model": {"path": str(model), "dtype": "float32", "attn_implementation": "sdpa"},
        "data": {"meta": str(data / "meta.json"), "max_length": 1024, "num_workers": 0},
        "policy": {"vision": "frozen", "projector": "frozen", "llm": "lora", "r": 16, "alpha": 32, "dropout": 0.05},
        "train": {"output_dir": str(out / "run"), **DEMO_TRAIN},
    }
    path = out / "train.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(out: str | Path = "demo_out", n_train: int = 1600, n_heldout: int = 100, epochs: float | None = None) -> dict:
    from .config import load_config
    from .merge import merge
    from .train import train
    from .validate import validate

    t0 = time.time()
    out = Path(out).resolve()
    print(f"[0/6] building the tiny InternVL and the synthetic dataset in {out}", flush=True)
    config_path = prepare(out, n_train, n_heldout)
    overrides = ["train.overwrite=true"] + ([f"train.epochs={epochs}"] if epochs else [])  # the demo rebuilds its folder
    cfg = load_config(config_path, overrides)

    # train audits the data before it loads the model and prints the report: the demo's data check is that
    # one (running `audit` here as well printed the same report twice).
    print("[1-4/6] data check, then LoRA training on the LLM (vision and projector frozen)", flush=True)
    adapter = train(cfg)

    print("[5/6] merge with parity check", flush=True)
    report = merge(adapter, out / "merged", overwrite=True)
    print(f"merge ok: adapter vs merged {report['max_abs_diff_adapter_vs_merged']:.2e}, "
          f"merged vs base {report['max_abs_diff_merged_vs_base']:.2e}", flush=True)

    print("[6/6] validate base vs merged on the held-out split (and with images blanked)", flush=True)
    heldout = str(out / "data" / "heldout_meta.json")
    summary = validate(cfg.model.path, str(out / "merged"), heldout, str(out / "validation"),
                       blank_images=True, max_new_tokens=8)
    meta = json.loads((adapter / "internvl_lora.json").read_text())
    result_summary = {
        "base_accuracy": summary["base"]["exact_match"],
        "tuned_accuracy": summary["tuned"]["exact_match"],
        "blank_image_accuracy": summary["tuned, images blanked"]["exact_match"],
        "chance": CHANCE,
        "heldout_samples": summary["samples"],
        "trainable_params": meta["trainable"]["trainable"],
        "total_params": meta["trainable"]["total"],
        "train_steps": meta.get("global_step"),
        "final_train_loss": meta.get("final_loss"),
        "merge_max_abs_diff": report["max_abs_diff_adapter_vs_merged"],
        "seconds": round(time.time() - t0, 1),
        "report": str(out / "validation" / "report.html"),
    }
    (out / "summary.json").write_text(json.dumps(result_summary, indent=2) + "\n")
    print(json.dumps(result_summary, indent=2))
    print(f"accuracy on held-out: base {result_summary['base_accuracy']:.2f} -> tuned "
          f"{result_summary['tuned_accuracy']:.2f} (chance {CHANCE:.2f}; tuned with blank images "
          f"{result_summary['blank_image_accuracy']:.2f}); report: {result_summary['report']}")
    return result_summary
