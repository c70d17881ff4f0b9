"""Merge trained adapters into a standalone checkpoint, in the format the base came in, and prove it.

    internvl-lora merge RUN/adapter OUT [--base BASE] [--dtype bfloat16]

LLM and vision LoRA (and any fully trained part) are folded in one operation. Before anything is
written, a parity check runs on a fixed probe batch with an image:
  1. logits(adapter model) == logits(merged) within a tolerance that fits the dtype;
  2. logits(merged) != logits(base) (catches an all-zero LoRA B, i.e. an adapter that learned nothing);
  3. the merged model reloaded from disk == the merged model in memory.
The output is written to a temporary folder next to OUT and renamed at the end, so an interrupted or
failed merge leaves no half-written output. The figures go to OUT/merge_report.json.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .chat import RUN_META, build_inputs, read_run_meta
from .data.encode import EncodeSettings
from .errors import UserError
from .internvl.checkpoint import inspect_checkpoint, load_model, load_tokenizer

# Max |logit difference| allowed between the adapter model and the merged model, by weight dtype.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.5, torch.float16: 0.1}
# The merged model must differ from the base by at least this much somewhere on the probe.
MIN_CHANGE = 1e-6


def probe_image(size: int) -> Image.Image:
    """A fixed, non-trivial image: a gradient with a few shapes."""
    img = Image.new("RGB", (size * 2, size))
    px = img.load()
    for x in range(size * 2):
        for y in range(size):
            px[x, y] = (x * 255 // (2 * size), y * 255 // size, 128)
    d = ImageDraw.Draw(img)
    d.ellipse([size // 4, size // 4, size * 3 // 4, size * 3 // 4], fill=(220, 40, 40))
    d.rectangle([size + size // 4, size // 4, size + size * 3 // 4, size * 3 // 4], fill=(40, 80, 220))
    return img


def probe_batch(settings: EncodeSettings, tokenizer, tmp: Path) -> dict:
    path = tmp / "probe.png"
    probe_image(settings.tile_size).save(path)
    ids, pixels = build_inputs("Describe the image in detail.", [str(path)], settings, tokenizer)
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values": pixels}


@torch.no_grad()
def logits_of(model, batch: dict) -> torch.Tensor:
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    device = next(model.parameters()).device
    inputs = {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in batch.items()}
    return model(**inputs, use_cache=False).logits.float().cpu()


def source_dtype(base: Path) -> torch.dtype:
    cfg = json.loads((base / "config.json").read_text())
    name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def save_checkpoint(model, tokenizer, base: Path, fmt: str, out: Path, meta: dict) -> None:
    """Write a merged model in the base's format, with tokenizer and processor settings."""
    if fmt == "original":
        from .internvl.convert import save_original

        save_original(model, base, out)
    else:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        for name in ("preprocessor_config.json", "chat_template.jinja", "processor_config.json"):
            if (base / name).exists():
                shutil.copy2(base / name, out / name)
    (out / RUN_META).write_text(json.dumps(meta, indent=2) + "\n")


def merge(adapter_dir: str | Path, out_dir: str | Path, base: str | Path | None = None,
          dtype: torch.dtype | None = None, overwrite: bool = False) -> dict:
    from peft import PeftModel

    t0 = time.time()
    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise UserError(f"{adapter_dir}: no adapter_config.json; give the adapter folder written by `train` (RUN/adapter)")
    meta = read_run_meta(adapter_dir) or {}
    if base:
        base_path = Path(base)
    elif meta.get("base_model"):
        base_path = Path(meta["base_model"])
    else:
        raise UserError(f"{adapter_dir}: no {RUN_META} to find the base model; pass --base")
    if not base_path.exists():
        raise UserError(f"base model {base_path} does not exist; pass --base")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty; choose another folder or pass --overwrite")
    info = inspect_checkpoint(base_path)
    dtype = dtype or source_dtype(base_path)
    tokenizer = load_tokenizer(base_path)
    settings = EncodeSettings.from_checkpoint(info, template=meta.get("template"))
    for k, v in meta.get("encode", {}).items():
        setattr(settings, k, v)

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        batch = probe_batch(settings, tokenizer, tmp)
        model = load_model(base_path, dtype=dtype)
        base_logits = logits_of(model, batch)
        model = PeftModel.from_pretrained(model, str(adapter_dir))
        adapter_logits = logits_of(model, batch)
        merged = model.merge_and_unload()
        merged_logits = logits_of(merged, batch)
        (tmp / "probe.png").unlink()
        out_meta = {**meta, "merged_from": str(adapter_dir.resolve()), "base_model": str(base_path.resolve())}
        save_checkpoint(merged, tokenizer, base_path, info.format, tmp, out_meta)
        reloaded = load_model(tmp, dtype=dtype)
        reloaded_logits = logits_of(reloaded, batch)
        tol = TOLERANCE.get(dtype, 1e-3)
        report = {
            "adapter": str(adapter_dir.resolve()), "base": str(base_path.resolve()), "format": info.format,
            "dtype": str(dtype).replace("torch.", ""), "probe_tokens": int(batch["input_ids"].shape[1]),
            "max_abs_diff_adapter_vs_merged": float((adapter_logits - merged_logits).abs().max()),
            "max_abs_diff_merged_vs_base": float((merged_logits - base_logits).abs().max()),
            "max_abs_diff_reloaded_vs_merged": float((reloaded_logits - merged_logits).abs().max()),
            "tolerance": tol, "seconds": 0.0,
        }
        problems = []
        if not report["max_abs_diff_adapter_vs_merged"] <= tol:
            problems.append(f"merged logits differ from the adapter model's by {report['max_abs_diff_adapter_vs_merged']:.3g} (> {tol})")
        if not report["max_abs_diff_merged_vs_base"] > MIN_CHANGE:
            problems.append("the merged model equals the base: the adapter changes nothing (all-zero LoRA B?)")
        if not report["max_abs_diff_reloaded_vs_merged"] <= tol:
            problems.append(f"the saved model reloads with logits {report['max_abs_diff_reloaded_vs_merged']:.3g} away from the merged one")
        report["ok"] = not problems
        report["problems"] = problems
        report["seconds"] = round(time.time() - t0, 2)
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
        if problems:
            raise UserError("merge parity check failed, nothing was written:\n  - " + "\n  - ".join(problems)
                            + f"\n{json.dumps(report, indent=2)}")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return report
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
