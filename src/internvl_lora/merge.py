"""Merge trained adapters into a standalone checkpoint, in the format the base came in, and prove it.

    internvl-lora merge RUN/adapter OUT [--base BASE] [--dtype bfloat16] [--streaming] [--overwrite]

LLM and vision LoRA (and any fully trained part, PEFT `modules_to_save`) are folded in one operation.
The output is a complete checkpoint in the base's format: an -hf base gives `save_pretrained` output, an
original base gives original keys (`save_original`: its config with `use_llm_lora` / `use_backbone_lora`
set to 0, its `*.py`, tokenizer and side files). The run's template and tiling settings are written where
other tools read them (original config.json `template` / `max_dynamic_patch`..., -hf
preprocessor_config.json `max_patches`...), the template's stop token is put in generation_config.json,
and `internvl_lora.json` records where the merge came from.

Two ways to merge:
* default: PEFT's `merge_and_unload` on the model in memory;
* `streaming=True`: shard by shard over the safetensors files (`merge_stream.py`), never holding more
  than one shard plus the adapter; bit-identical to the default in float32.

A parity check runs on a fixed probe (a prompt with an image, so vision LoRA is exercised):
  1. logits(adapter model) == logits(merged) within a tolerance that fits the dtype;
  2. logits(merged) != logits(base) (an adapter that learned nothing is refused);
  3. the merged model reloaded from disk == the merged model in memory.
In streaming mode the merged model exists only on disk: 1 and 3 become one comparison of the reloaded
output against the adapter model. The check loads the model (base + adapter, then the merged output),
one at a time; `check=False` skips it. The figures go to OUT/merge_report.json.

Written atomically: everything goes to a staging folder next to OUT, `.OUT.merge-incomplete-PID-XXXX`
(with an INCOMPLETE_MERGE.txt inside and the checkpoint one level down, so it cannot be mistaken for a
checkpoint), which is renamed to OUT at the very end. An exception or Ctrl-C removes it; after a hard kill
it stays, and the next merge into the same OUT removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .data.encode import EncodeSettings
from .errors import UserError
from .infer import build_inputs, quiet_loading, settings_for
from .run_dir import DTYPE_NAMES, RUN_META, adapter_run_meta, check_base_fingerprint, parse_dtype
from .internvl.checkpoint import inspect_checkpoint, load_model, load_tokenizer
from .internvl.format.config import read_json

# Max |logit difference| allowed between the adapter model and the merged model, relative to the
# largest |logit| of the probe (at least 1), by weight dtype. In float32 the two differ by float
# reassociation only (~1e-6 relative). In 16-bit types the merged weight W + scale*B@A is rounded once
# more than the adapter model's separate W and LoRA paths: on the tiny random test model that moves
# the logits by ~2 % of their largest value in bfloat16 (8-bit mantissa), so the bound is 5 %. A wrong
# merge (a part or a scale missing) moves them by the size of the adapter's own effect.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
# The merged model must differ from the base by more than this somewhere on the probe.
MIN_CHANGE = 1e-6
REPORT = "merge_report.json"
STAGING_INFIX = ".merge-incomplete-"
STAGING_MARKER = "INCOMPLETE_MERGE.txt"


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
    cfg = read_json(base / "config.json", checkpoint_file=True)
    name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


# --------------------------------------------------------------------------------------------------
# Staging folder
# --------------------------------------------------------------------------------------------------


def _staging_pattern(out: Path) -> re.Pattern:
    return re.compile(re.escape(f".{out.name}{STAGING_INFIX}") + r"(?P<pid>\d+)-[0-9a-f]+$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_staging(out: str | Path) -> list[Path]:
    """Staging folders of earlier merges into `out` whose process is gone (killed mid-way)."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return []
    pattern = _staging_pattern(out)
    stale = []
    for p in sorted(out.parent.iterdir()):
        m = pattern.match(p.name)
        if m and p.is_dir() and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            stale.append(p)
    return stale


def _new_staging(out: Path) -> Path:
    staging = out.parent / f".{out.name}{STAGING_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir(parents=True)
    except OSError as e:  # a read-only place, or a parent that is a file
        raise UserError(f"{out}: cannot write the output there ({e.strerror}: {staging.parent})") from None
    (staging / STAGING_MARKER).write_text(
        f"An unfinished `internvl-lora merge` into {out} (process {os.getpid()}).\n"
        "This is not a checkpoint. If that process is gone, delete this folder; the next merge into the\n"
        "same output folder deletes it too.\n")
    return staging


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt, so that a terminated merge cleans up like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def save_checkpoint(model, tokenizer, base: Path, fmt: str, out: Path, dtype: torch.dtype) -> None:
    """Write a merged model into `out` (which must not exist) in the base's format, with every side file
    of the base (tokenizer, processor settings, chat template, `*.py` for original checkpoints)."""
    if fmt == "original":
        from .internvl.format.save import save_original

        save_original(model, base, out, dtype=dtype)
        return
    model.save_pretrained(out)
    for p in sorted(base.iterdir()):  # tokenizer files, preprocessor / processor config, chat template, ...
        if p.is_file() and not (out / p.name).exists() and p.suffix not in (".safetensors", ".bin", ".pt", ".pth") \
                and not p.name.endswith(".index.json"):
            shutil.copy2(p, out / p.name)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def finalize(out: Path, fmt: str, settings: EncodeSettings, tokenizer, dtype: torch.dtype | None, meta: dict) -> None:
    """Make the written checkpoint describe how it was trained, for every tool that reads it:
    the template's stop token in generation_config.json, the run's tiling (and, for original checkpoints,
    template) in the config files, the LoRA flags cleared, the dtype written, and internvl_lora.json."""
    stop = tokenizer.convert_tokens_to_ids(settings.template.stop)
    gen_path = out / "generation_config.json"
    gen = _read_json(gen_path)
    eos = gen.get("eos_token_id")
    eos = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
    if stop is not None and stop != tokenizer.unk_token_id and stop not in eos:
        eos.append(stop)
    if eos:
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if gen.get("pad_token_id") is None and tokenizer.pad_token_id is not None:
        gen["pad_token_id"] = tokenizer.pad_token_id
    _write_json(gen_path, gen)

    cfg_path = out / "config.json"
    cfg = _read_json(cfg_path)
    name = DTYPE_NAMES.get(dtype) if dtype is not None else None
    if fmt == "original":
        cfg.update(use_llm_lora=0, use_backbone_lora=0, template=settings.template.name,
                   max_dynamic_patch=settings.max_dynamic_patch, min_dynamic_patch=settings.min_dynamic_patch,
                   dynamic_image_size=settings.dynamic_image_size, use_thumbnail=settings.use_thumbnail)
        if name:
            cfg["torch_dtype"] = name
            for sub in ("llm_config", "vision_config"):
                if isinstance(cfg.get(sub), dict) and "torch_dtype" in cfg[sub]:
                    cfg[sub]["torch_dtype"] = name
    else:
        if name:
            for key in ("dtype", "torch_dtype"):
                if key in cfg:
                    cfg[key] = name
        proc_path = out / "preprocessor_config.json"
        if proc_path.is_file():
            proc = _read_json(proc_path)
            proc.update(max_patches=settings.max_dynamic_patch, min_patches=settings.min_dynamic_patch,
                        crop_to_patches=settings.dynamic_image_size)
            _write_json(proc_path, proc)
    _write_json(cfg_path, cfg)
    _write_json(out / RUN_META, meta)


# --------------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------------


def _resolve_base(adapter_dir: Path, meta: dict, base) -> Path:
    if base:
        base_path = Path(base)
    elif meta.get("base_model"):
        base_path = Path(meta["base_model"])
    else:
        raise UserError(f"{adapter_dir}: no {RUN_META} to find the base model; pass --base")
    if not base_path.exists():
        raise UserError(f"base model {base_path} does not exist; pass --base")
    return base_path


def _check_out(out: Path, inputs: list[Path], overwrite: bool) -> None:
    o = out.resolve()
    for p in inputs:
        p = p.resolve()
        if o == p or o in p.parents:
            raise UserError(f"{out}: the output folder would replace the input {p}; choose another folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    parent = next(p for p in out.parents if p.exists())  # the folder the output (and its staging) goes in
    if not out.exists() and (not parent.is_dir() or not os.access(parent, os.W_OK)):
        raise UserError(f"{out}: cannot be created: {parent} is {'not a folder' if not parent.is_dir() else 'read-only'}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty; choose another folder or pass --overwrite")


def _learned_nothing(adapter) -> str | None:
    if adapter.lora and len(adapter.zero_b) == len(adapter.lora) and not adapter.full and not adapter.other:
        return (f"all {len(adapter.lora)} LoRA B matrices of {adapter.path} are zero: the adapter has learned "
                "nothing (an untrained adapter, a run stopped before its first optimizer step, or a ZeRO-3 save "
                "that gathered empty tensors), so the merged model would equal the base")
    return None


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def merge(adapter_dir: str | Path, out_dir: str | Path, base: str | Path | None = None,
          dtype: torch.dtype | str | None = None, overwrite: bool = False, streaming: bool = False,
          check: bool = True) -> dict:
    """Merge `adapter_dir` into its base and write OUT atomically; returns the merge report."""
    from .internvl.format.adapter import read_adapter
    from .internvl.format.adapter_check import apply_adapter, check_adapter_files
    from .merge_stream import stream_merge

    t0 = time.time()
    adapter_dir, out = Path(adapter_dir), Path(out_dir).absolute()
    check_adapter_files(adapter_dir)  # JSON config, whole safetensors weights; pickle refused
    meta = adapter_run_meta(adapter_dir) or {}
    base_path = _resolve_base(adapter_dir, meta, base)
    check_base_fingerprint(meta, base_path, given=bool(base))
    _check_out(out, [adapter_dir, base_path], overwrite)
    requested = parse_dtype(dtype)
    work_dtype = requested or source_dtype(base_path)
    adapter = read_adapter(adapter_dir, streaming=streaming)
    nothing = _learned_nothing(adapter)
    if nothing:
        raise UserError(f"merge refused, nothing was written: {nothing}")
    info = inspect_checkpoint(base_path)
    with quiet_loading():
        tokenizer = load_tokenizer(base_path)
    settings = settings_for(info, meta)

    for stale in stale_staging(out):
        shutil.rmtree(stale, ignore_errors=True)
    staging = _new_staging(out)
    ckpt = staging / "checkpoint"
    out_meta = {**meta, "merged_from": str(adapter_dir.resolve()), "base_model": str(base_path.resolve()),
                "base_format": info.format, "merge": {"mode": "streaming" if streaming else "peft",
                                                      "dtype": DTYPE_NAMES.get(work_dtype)}}
    report = {"adapter": str(adapter_dir.resolve()), "base": str(base_path.resolve()), "format": info.format,
              "mode": "streaming" if streaming else "peft", "dtype": DTYPE_NAMES.get(work_dtype),
              "lora_modules": len(adapter.lora), "full_tensors": len(adapter.full),
              "zero_lora_b_modules": len(adapter.zero_b)}
    try:
        with _sigterm_as_interrupt(), quiet_loading():
            batch = probe_batch(settings, tokenizer, staging) if check else None
            logits = {}
            if streaming:
                ckpt.mkdir()
                report.update(stream_merge(base_path, adapter, ckpt, dtype=requested))
                finalize(ckpt, info.format, settings, tokenizer, requested, out_meta)
                if check:
                    model = apply_adapter(load_model(base_path, dtype=work_dtype), adapter_dir)
                    logits["adapter"] = logits_of(model, batch)
                    with model.disable_adapter():
                        logits["base"] = logits_of(model, batch)
                    del model
                    logits["merged"] = logits_of(load_model(ckpt, dtype=work_dtype), batch)
            else:
                model = apply_adapter(load_model(base_path, dtype=work_dtype), adapter_dir)
                if check:
                    logits["adapter"] = logits_of(model, batch)
                    with model.disable_adapter():
                        logits["base"] = logits_of(model, batch)
                merged = model.merge_and_unload()
                del model
                if check:
                    logits["merged"] = logits_of(merged, batch)
                save_checkpoint(merged, tokenizer, base_path, info.format, ckpt, work_dtype)
                del merged
                finalize(ckpt, info.format, settings, tokenizer, work_dtype, out_meta)
                if check:
                    logits["reloaded"] = logits_of(load_model(ckpt, dtype=work_dtype), batch)
        problems = _parity(report, logits, work_dtype, streaming) if check else []
        if not check:
            report["parity_check"] = "skipped"
        report["seconds"] = round(time.time() - t0, 2)
        report["ok"] = not problems
        report["problems"] = problems
        if problems:
            raise UserError("merge parity check failed, nothing was written:\n  - " + "\n  - ".join(problems)
                            + f"\n{json.dumps(report, indent=2)}")
        _write_json(ckpt / REPORT, report)
        if out.exists():  # empty, or --overwrite: keep the old one until the new one is in place
            out.rename(staging / "previous")
        ckpt.rename(out)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _parity(report: dict, logits: dict, dtype: torch.dtype, streaming: bool) -> list[str]:
    scale = max(1.0, float(logits["adapter"].abs().max()))
    tol = TOLERANCE.get(dtype, 1e-4) * scale
    report.update({
        "probe_tokens": int(logits["adapter"].shape[1]),
        "max_abs_logit": round(scale, 4),
        "max_abs_diff_adapter_vs_merged": _max_diff(logits["adapter"], logits["merged"]),
        "max_abs_diff_merged_vs_base": _max_diff(logits["merged"], logits["base"]),
        "max_abs_diff_reloaded_vs_merged": None if streaming else _max_diff(logits["reloaded"], logits["merged"]),
        "top1_agreement_adapter_vs_merged": float(
            (logits["adapter"].argmax(-1) == logits["merged"].argmax(-1)).float().mean()),
        "tolerance": tol,
    })
    if streaming:
        report["note"] = "streaming: the merged model is the written output, loaded from disk"
    problems = []
    d = report["max_abs_diff_adapter_vs_merged"]
    if not d <= tol:
        problems.append(f"merged logits differ from the adapter model's by {d:.3g} (> {tol:.3g})")
    d = report["max_abs_diff_merged_vs_base"]
    if not d > MIN_CHANGE:
        problems.append("the merged model equals the base: the adapter changes nothing (all-zero LoRA B?)")
    elif report["max_abs_diff_adapter_vs_merged"] > 0.5 * d:
        report["warning"] = (f"the merge moves the probe logits by {report['max_abs_diff_adapter_vs_merged']:.3g}, "
                             f"more than half of what the adapter itself changes ({d:.3g}): at this dtype the "
                             "merged model keeps little of the training; merge in float32 or keep the adapter")
    d = report["max_abs_diff_reloaded_vs_merged"]
    if d is not None and not d <= tol:
        problems.append(f"the saved model reloads with logits {d:.3g} away from the merged one")
    return problems
