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

from .data.synthetic import COLORS, make_dataset, make_preference_dataset, vocabulary
from .internvl.tiny import build_tiny_checkpoint

CHANCE = 1 / len(COLORS)

# The demo's training recipe: the seed recipe's shape (LoRA r16 on the LLM, cosine, warmup) with a
# learning rate and length suited to a random tiny model on a CPU.
DEMO_TRAIN = {
    "per_device_batch_size": 8, "grad_accum": 1, "lr": 3.0e-3, "lr_scheduler": "cosine", "warmup_ratio": 0.05,
    "weight_decay": 0.0, "epochs": 4, "gradient_checkpointing": False, "logging_steps": 25, "save_steps": 500,
    "save_total_limit": 1, "report_to": ["tensorboard"], "seed": 0, "group_by_length": True,
}


# The preference demo (train.objective: mpo): the same recipe on preference pairs of the same task, with an
# evaluation on the held-out pairs at the end; docs/preference.md has the learning-rate sweep behind it.
PREFERENCE_TRAIN = {**DEMO_TRAIN, "objective": "mpo", "epochs": 2}


def prepare(out: str | Path, n_train: int = 1600, n_heldout: int = 100, objective: str = "sft") -> Path:
    """Write the tiny model, the dataset (preference pairs for objective "mpo") and a ready training config;
    return the config path."""
    out = Path(out).resolve()
    model = build_tiny_checkpoint(out / "model", vocabulary())
    make = make_preference_dataset if objective == "mpo" else make_dataset
    data = make(out / "data", n_train=n_train, n_heldout=n_heldout)
    config = {
        "model": {"path": str(model), "dtype": "float32", "attn_implementation": "sdpa"},
        "data": {"meta": str(data / "meta.json"), "max_length": 1024, "num_workers": 0},
        "policy": {"vision": "frozen", "projector": "frozen", "llm": "lora", "r": 16, "alpha": 32, "dropout": 0.05},
        "train": {"output_dir": str(out / "run"), **(PREFERENCE_TRAIN if objective == "mpo" else DEMO_TRAIN)},
    }
    if objective == "mpo":
        config["data"]["eval_meta"] = str(data / "heldout_meta.json")
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


def run_preference(out: str | Path = "demo_out", n_train: int = 800, n_heldout: int = 100,
                   epochs: float | None = None) -> dict:
    """The preference (MPO) workflow on the same tiny model: pairs of the coloured-shapes task (the chosen
    answer the right colour, the rejected one another), trained with LoRA, merged, and validated on held-out
    pairs: how often each model ranks the chosen answer first (a random model: about 0.5), the tuned model's
    reward accuracy against the base, and the same ranking with every image blanked (back to about 0.5:
    the preference comes from the images)."""
    from .config import load_config
    from .merge import merge
    from .train import train
    from .validate import validate

    t0 = time.time()
    out = Path(out).resolve()
    print(f"[0/6] building the tiny InternVL and synthetic preference pairs in {out}", flush=True)
    config_path = prepare(out, n_train, n_heldout, objective="mpo")
    cfg = load_config(config_path, ["train.overwrite=true"] + ([f"train.epochs={epochs}"] if epochs else []))
    print("[1-4/6] data check, then MPO training with LoRA on the LLM (reference: the adapters disabled)", flush=True)
    adapter = train(cfg)
    print("[5/6] merge with parity check", flush=True)
    report = merge(adapter, out / "merged", overwrite=True)
    print("[6/6] validate base vs merged on the held-out pairs (and with images blanked)", flush=True)
    summary = validate(cfg.model.path, str(out / "merged"), str(out / "data" / "heldout_meta.json"),
                       str(out / "validation"), blank_images=True, max_new_tokens=8)
    meta = json.loads((adapter / "internvl_lora.json").read_text())
    result = {
        "base_ranking_accuracy": summary["base"]["ranking_accuracy"],
        "tuned_ranking_accuracy": summary["tuned"]["ranking_accuracy"],
        "tuned_reward_accuracy": summary["tuned"]["reward_accuracy"],
        "blank_image_ranking_accuracy": summary["tuned, images blanked"]["ranking_accuracy"],
        "tuned_accuracy": summary["tuned"]["exact_match"],
        "heldout_pairs": summary["samples"],
        "train_steps": meta.get("global_step"),
        "final_train_loss": meta.get("final_loss"),
        "merge_max_abs_diff": report["max_abs_diff_adapter_vs_merged"],
        "seconds": round(time.time() - t0, 1),
        "report": str(out / "validation" / "report.html"),
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"held-out pairs, chosen ranked first: base {result['base_ranking_accuracy']:.2f} -> tuned "
          f"{result['tuned_ranking_accuracy']:.2f} (reward accuracy vs base {result['tuned_reward_accuracy']:.2f}; "
          f"tuned with blank images {result['blank_image_ranking_accuracy']:.2f}); report: {result['report']}")
    return result
