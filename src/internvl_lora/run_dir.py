"""The run folder (`train.output_dir`): what training writes there and how it is read back.

    OUT/config.yaml              the resolved config (compared on resume: `check_resume_compatible`)
    OUT/internvl_lora.json       the run record (`RUN_META`: base model, encode settings, versions, ...)
    OUT/metrics.jsonl            one record per log interval (`read_metrics`)
    OUT/checkpoint-N/            adapter-only checkpoints (`checkpoints`, `find_resume_checkpoint`)
    OUT/adapter_init/            PiSSA / OLoRA: the adapter as initialised (`INIT_ADAPTER`)
    OUT/adapter/                 the final adapter, written atomically (`save_final`)

docs/training.md describes the folder for users.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import platform
import shlex
import shutil
import sys
import zipfile
from pathlib import Path

import torch
import yaml

from .distributed import is_main, print0, world_size
from .errors import CheckpointError, CheckpointSaveError, UserError

RUN_META = "internvl_lora.json"
INIT_ADAPTER = "adapter_init"  # PiSSA / OLoRA: the adapter as initialised (for the conversion on save)
CHECKPOINT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors",
                      "model.safetensors.index.json", "pytorch_model.bin")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]

def read_run_meta(path: Path) -> dict | None:
    f = Path(path) / RUN_META
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{f}: the run record is not valid JSON ({e})") from None


def adapter_run_meta(path: Path) -> dict | None:
    """The run record of an adapter folder: RUN/adapter holds its own; a Trainer checkpoint RUN/checkpoint-N
    has it one folder up."""
    path = Path(path)
    meta = read_run_meta(path)
    if meta is None and path.name.startswith("checkpoint-"):
        meta = read_run_meta(path.parent)
    return meta


def model_folder(path: str) -> str:
    """The model of `path`: an adapter folder stands for the base recorded with it, other folders for themselves."""
    meta = adapter_run_meta(Path(path)) if (Path(path) / "adapter_config.json").is_file() else None
    return meta["base_model"] if meta and meta.get("base_model") else path


def model_fingerprint(folder: str | Path) -> str:
    """A cheap identity of a model folder: config.json's bytes and each safetensors file's name, size and
    header (tensor names, shapes, offsets), without reading the tensors."""
    folder = Path(folder)
    h = hashlib.sha256()
    cfg = folder / "config.json"
    h.update(cfg.read_bytes() if cfg.is_file() else b"")
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            raw = fh.read(8)
            length = int.from_bytes(raw, "little") if len(raw) == 8 else 0
            h.update(f"{f.name}:{f.stat().st_size}:".encode() + fh.read(min(length, 100_000_000)))
    return h.hexdigest()[:16]


def check_base_fingerprint(meta: dict, base_path: Path, given: bool) -> None:
    """Compare a base with the fingerprint recorded at training time (older runs have none: nothing to
    compare). A base given by the user that differs gets a warning; the recorded one that changed is refused."""
    recorded = meta.get("base_fingerprint")
    if not recorded or model_fingerprint(base_path) == recorded:
        return
    what = f"{base_path}: this base model is not the one the adapter was trained on (its config or weights differ)"
    if not given:
        raise UserError(f"{what}; the recorded base changed since training. Pass the right one with --base")
    print(f"warning: {what}; going on as --base asks", file=sys.stderr)


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).replace("torch.", "")]
    except KeyError:
        raise UserError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}") from None



def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def read_json(path: Path):
    return json.loads(path.read_text())


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict]:
    """Records of a metrics.jsonl (those logged after `up_to_step` are dropped: a resumed run redoes them)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if up_to_step is None or row.get("step", 0) <= up_to_step:
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------
# The run record


def fingerprint(paths: list[str]) -> str:
    """sha256 over the annotation files' bytes (images are not hashed)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def environment() -> dict:
    """Library versions and hardware, for the run record."""
    import accelerate
    import peft
    import transformers

    from . import __version__

    env = {
        "internvl_lora": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__,
        "deepspeed": _version("deepspeed"), "platform": platform.platform(), "world_size": world_size(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return {k: v for k, v in env.items() if v is not None}


def run_metadata(cfg, info, settings, data_fp: dict) -> dict:
    """The run record: config `cfg` (RunConfig), checkpoint `info`, encode `settings`, data fingerprints."""
    return {
        "base_model": str(Path(cfg.model.path).resolve()),
        "base_format": info.format,
        "base_fingerprint": model_fingerprint(cfg.model.path),
        "template": settings.template.name,
        "encode": {k: getattr(settings, k) for k in (
            "tile_size", "tokens_per_tile", "max_dynamic_patch", "min_dynamic_patch", "use_thumbnail",
            "dynamic_image_size", "normalize_type", "max_length", "jpeg_draft", "fast_resize", "exif_transpose",
            "alpha_background")},
        "policy": cfg.to_dict()["policy"],
        "dataset_fingerprint": data_fp["train"],
        "data": data_fp,
        "versions": environment(),
        "command": " ".join(sys.argv),
    }


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def is_complete_checkpoint(folder: Path) -> bool:
    """A checkpoint is complete once trainer_state.json (written last by the Trainer) is readable and the
    weights are there; a folder cut short by a kill or a full disk is not."""
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any((folder / name).exists() for name in CHECKPOINT_WEIGHTS) or any(folder.glob("global_step*"))


def checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders of a run folder, by step."""
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        name = p.name
        if p.is_dir() and name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
            found.append((int(name[len("checkpoint-"):]), p))
    return [p for _, p in sorted(found)]


def last_complete_checkpoint(out: Path) -> Path | None:
    done = [p for p in checkpoints(out) if is_complete_checkpoint(p)]
    return done[-1] if done else None


def find_resume_checkpoint(out: Path) -> Path | None:
    """The last complete checkpoint; incomplete ones after it (interrupted saves) are reported and removed."""
    last = last_complete_checkpoint(out)
    for p in checkpoints(out):
        if not is_complete_checkpoint(p) and (last is None or int(p.name.split("-")[1]) > int(last.name.split("-")[1])):
            print0(f"{p} is incomplete (interrupted while saving); ignoring it")
            if is_main():
                shutil.rmtree(p, ignore_errors=True)
    return last


# What the Trainer loads from a checkpoint besides the adapter weights (torch pickles, loaded weights-only).
RESUME_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", "rng_state_*.pth")


def damaged_resume_file(folder: Path) -> str | None:
    """What is wrong with a checkpoint's training state (None: nothing). Torch files are opened weights-only
    as the Trainer does (a pickle that would run code is refused) but memory-mapped (no tensor data read)."""
    from transformers.trainer_pt_utils import safe_globals

    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        return f"{folder / 'trainer_state.json'}: not readable JSON ({e})"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return f"{folder / 'trainer_state.json'}: no integer global_step"
    for f in sorted({f for pattern in RESUME_STATE for f in folder.glob(pattern)}):
        try:
            size = f.stat().st_size
            if size == 0:
                return f"{f}: empty (0 bytes)"
            if not zipfile.is_zipfile(f):  # torch.save writes a zip whose directory comes last
                return f"{f}: cut short or not a torch file ({size:,} bytes, no complete zip archive)"
            with safe_globals():
                torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except OSError as e:
            return f"{f}: cannot be read ({e.strerror or e})"
        except pickle.UnpicklingError:
            return f"{f}: holds a pickle of more than tensors, which could run code when loaded (it was not loaded)"
        except (RuntimeError, EOFError, ValueError) as e:  # torch's reader: the archive is damaged
            return f"{f}: damaged ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
    return None


def check_resume_state(out: Path, resume: Path, argv: list[str]) -> None:
    """Refuse, before the model is loaded, to resume from a checkpoint whose training state is damaged
    (cut short, empty, or an unsafe pickle), naming the file, the previous sound checkpoint and the command
    that continues from it. Nothing is deleted: the user decides."""
    problem = damaged_resume_file(resume)
    if problem is None:
        return
    earlier = [p for p in checkpoints(out) if int(p.name.split("-")[1]) < int(resume.name.split("-")[1])]
    sound = next((p for p in reversed(earlier) if is_complete_checkpoint(p) and damaged_resume_file(p) is None), None)
    rm = f"rm -r {shlex.quote(str(resume))}"
    raise CheckpointError(
        f"cannot resume from {resume}: {problem}. "
        + (f"The previous checkpoint {sound} is sound: to resume from it, delete the damaged one: {rm}; "
           f"then run {resume_command(out, argv)}" if sound else
           f"No earlier checkpoint is sound: delete it ({rm}) and run the same command with train.resume=true "
           "to start over"))


RUN_OUTPUTS = ("adapter", ".adapter.partial", INIT_ADAPTER, "metrics.jsonl", "tensorboard", "loss_curve.png",
               RUN_META, "trainable_params.json", "config.yaml")


def earlier_run(out: Path) -> list[str]:
    """What of an earlier run `out` holds (a final adapter, checkpoints, metrics), for the refusal message."""
    if not out.is_dir():
        return []
    held = []
    if (out / "adapter").exists():
        held.append("a final adapter (adapter/)")
    if checkpoints(out):
        held.append(f"{len(checkpoints(out))} checkpoint(s) ({', '.join(p.name for p in checkpoints(out))})")
    if (out / "metrics.jsonl").exists():
        held.append("metrics.jsonl")
    return held


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is loaded or written, an output_dir that is a file or holds an earlier run
    (unless train.resume continues it or train.overwrite replaces it): a second run must not lose the first."""
    if resume and overwrite:
        raise UserError("train.resume=true and train.overwrite=true contradict each other: choose one")
    bad = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if bad is not None:
        raise UserError(f"train.output_dir {out}: {bad} is a file, not a folder; choose another train.output_dir")
    held = earlier_run(out)
    if held and not (resume or overwrite):
        raise UserError(
            f"train.output_dir {out} already holds an earlier run: {', '.join(held)}. Add train.resume=true to "
            "continue it, or train.overwrite=true to start over (its outputs are deleted), or choose another "
            "train.output_dir")


def clear_earlier_run(out: Path) -> None:
    """train.overwrite: delete what an earlier run wrote there (only those names: the folder may hold other files)."""
    for p in [*checkpoints(out), *(out / name for name in RUN_OUTPUTS)]:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def resume_command(out: Path, argv: list[str], overwrite: bool = False) -> str:
    """The command that continues this run: the same `train` command line with train.resume=true (or, when
    train() was not started from the command line, the saved config, whose paths are absolute)."""
    if len(argv) > 1 and argv[1] == "train":
        args = [a for a in argv[2:] if not a.startswith(("train.resume=", "train.overwrite="))]
        return shlex.join(["internvl-lora", "train", *args, "train.resume=true"])
    extra = ["train.overwrite=false"] if overwrite else []  # the saved config keeps the run's overwrite=true
    return shlex.join(["internvl-lora", "train", str(out / "config.yaml"), *extra, "train.resume=true"])


def check_resume_compatible(out: Path, cfg) -> None:
    """The policy decides which parameters exist: a checkpoint of another policy cannot be resumed."""
    saved = out / "config.yaml"
    if not saved.exists():
        return
    try:
        old = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError):
        return
    new = cfg.to_dict()
    keys = ("vision", "projector", "llm", "r", "llm_targets", "vision_targets", "use_dora", "init")
    old_policy = old.get("policy") or {} if isinstance(old, dict) else {}
    diff = [k for k in keys if k in old_policy and old_policy[k] != new["policy"][k]]
    if diff:
        raise UserError(
            f"cannot resume {out}: the checkpoints were trained with a different policy ("
            + ", ".join(f"policy.{k}: {old_policy[k]!r} -> {new['policy'][k]!r}" for k in diff)
            + "); use the original settings or a new train.output_dir")
    for section, key in (("train", "per_device_batch_size"), ("train", "grad_accum"), ("train", "seed"),
                         ("data", "max_tokens_per_batch")):
        before = (old.get(section) or {}).get(key) if isinstance(old, dict) else None
        if before is not None and before != new[section][key]:
            print0(f"warning: {section}.{key} changed from {before} to {new[section][key]} since the checkpoint; "
                   "the data position and order after resuming will not match the interrupted run")


def write_failure(e: BaseException) -> str | None:
    """Why a checkpoint write failed; None for an unknown exception (a bug: it keeps its traceback). torch.save
    reports a failed write (disk full) as a RuntimeError from its zip writer ("PytorchStreamWriter failed ...")."""
    if isinstance(e, OSError):
        return f"{e.strerror or e}{f' ({e.filename})' if getattr(e, 'filename', None) else ''}"
    text = str(e)
    if isinstance(e, RuntimeError) and "PytorchStreamWriter failed" in text:
        detail = text[text.index("PytorchStreamWriter failed"):].splitlines()[0]
        return f"torch could not write the file, most likely the disk is full ({detail})"
    return None


def save_final(trainer, out: Path, init_dir: Path | None) -> Path:
    """Write OUT/adapter atomically (into a temporary folder, then renamed)."""
    final, tmp = out / "adapter", out / ".adapter.partial"
    try:
        if is_main() and tmp.exists():
            shutil.rmtree(tmp)
        if init_dir is not None:
            # PiSSA / OLoRA: a plain rank-2r LoRA that applies to the original base weights.
            if is_main():
                trainer.accelerator.unwrap_model(trainer.model).save_pretrained(
                    str(tmp), path_initial_model_for_weight_conversion=str(init_dir))
        else:
            trainer.save_model(str(tmp))
        if is_main():
            _check_adapter_holds_weights(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except (OSError, RuntimeError) as e:
        reason = write_failure(e)
        if reason is None:
            raise
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        last = last_complete_checkpoint(out)
        raise CheckpointSaveError(
            f"could not write the final adapter to {final}: {reason}. "
            + (f"The last checkpoint {last} is intact: free disk space and run the same command with "
               "train.resume=true to write the adapter from it" if last else "No checkpoint was kept")) from None
    return final


def _check_adapter_holds_weights(folder: Path) -> None:
    """A saved adapter without a tensor is a bug of the saving path (it happened with PEFT under FSDP's
    activation-checkpoint wrapper): stop instead of leaving an adapter that silently changes nothing."""
    path = folder / "adapter_model.safetensors"
    if not path.exists():
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if not list(f.keys()):
            raise RuntimeError(f"the adapter saved to {path} holds no weights: the trained adapter weights were not "
                               "found in the model's state dict (a wrapper renamed the layers?)")
