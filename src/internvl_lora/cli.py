"""The `internvl-lora` command line.

    internvl-lora demo                                  # the whole workflow on a tiny model, CPU
    internvl-lora data check META --model CKPT          # audit every sample
    internvl-lora data inspect META --model CKPT --index 0
    internvl-lora data convert SRC DST --from sharegpt
    internvl-lora train CONFIG.yaml [section.key=value ...]
    internvl-lora merge RUN/adapter OUT
    internvl-lora chat MODEL --image a.jpg "question"
    internvl-lora validate --base BASE --tuned TUNED --data HELDOUT
    internvl-lora convert SRC DST --to hf|original

Problems with the input are printed as one paragraph (no traceback) and the exit code is 2.
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="LoRA fine-tuning of InternVL vision-language models on your own multimodal data.")
data_app = typer.Typer(no_args_is_help=True, help="Check, inspect and convert datasets in the official InternVL format.")
app.add_typer(data_app, name="data")


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"internvl-lora {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main_options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="print the package version and exit"),
):
    """LoRA fine-tuning of InternVL vision-language models on your own multimodal data."""


def _settings(model: str, template: Optional[str], max_length: int, max_dynamic_patch: Optional[int],
              truncation: str = "drop"):
    from .data.encode import EncodeSettings
    from .internvl.checkpoint import inspect_checkpoint, load_tokenizer
    from .run_dir import model_folder

    model = model_folder(model)  # an adapter folder stands for its recorded base
    info = inspect_checkpoint(model)
    tokenizer = load_tokenizer(model)
    return tokenizer, EncodeSettings.from_checkpoint(info, template=template, max_length=max_length,
                                                     max_dynamic_patch=max_dynamic_patch, truncation=truncation)


_OBJECTIVE_HELP = ("sft | mpo: check as supervised conversations or as preference pairs (question / chosen / "
                   "rejected); default: detected from the first record")


@data_app.command("check")
def data_check(
    meta: str = typer.Argument(..., help="meta JSON file or .jsonl annotation file"),
    model: str = typer.Option(..., "--model", help="checkpoint folder (only tokenizer and config are read)"),
    template: Optional[str] = typer.Option(None, help="override the checkpoint's template"),
    max_length: int = typer.Option(8192, help="max tokens per sample after image expansion"),
    max_dynamic_patch: Optional[int] = typer.Option(None, help="max tiles per image (default: checkpoint's)"),
    truncation: str = typer.Option("drop", help="drop | cut_text"),
    objective: Optional[str] = typer.Option(None, "--objective", help=_OBJECTIVE_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the summary and every problem as JSON"),
):
    """Audit every sample: JSON, roles, answers, images, placeholder counts, lengths after tiling."""
    from .data.audit import audit, audit_workers, format_report
    from .data.meta import iter_lines, load_meta
    from .data.preference import OBJECTIVE_NAMES, choose_objective

    specs = load_meta(meta)
    objective, how = choose_objective(objective, iter_lines(specs))
    tokenizer, settings = _settings(model, template, max_length, max_dynamic_patch, truncation)
    result = audit(specs, tokenizer, settings, objective=objective, workers=audit_workers())
    if as_json:
        print(json.dumps({"objective": objective, **result.summary(),
                          "problems": [p.__dict__ for p in result.problems],
                          "warnings": [w.__dict__ for w in result.warnings]}, indent=2))
    else:
        print(f"checked as {OBJECTIVE_NAMES[objective]}; {how}")
        print(format_report(result))
    raise typer.Exit(0 if result.ok else 1)


@data_app.command("inspect")
def data_inspect(
    meta: str = typer.Argument(..., help="meta JSON file or .jsonl annotation file"),
    model: str = typer.Option(..., "--model", help="checkpoint folder (only tokenizer and config are read)"),
    index: str = typer.Option("0", help="N, N:M or all"),
    template: Optional[str] = typer.Option(None, help="override the checkpoint's template"),
    max_length: int = typer.Option(8192, help="max tokens per sample after image expansion"),
    max_dynamic_patch: Optional[int] = typer.Option(None, help="max tiles per image (default: checkpoint's)"),
    objective: Optional[str] = typer.Option(None, "--objective", help=_OBJECTIVE_HELP),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per sample"),
    save_tiles: Optional[str] = typer.Option(None, help="write every tile as a PNG into this folder"),
    color: bool = typer.Option(True, help="highlight trained spans with colour (else [[...]])"),
):
    """Show exactly what samples train on: prompt with trained spans, token count, tiles per image
    (a preference pair: the shared prompt, then the chosen and the rejected answer)."""
    from .data.inspect import inspect, parse_index
    from .data.meta import load_meta, read_lines
    from .data.preference import choose_objective

    lines = read_lines(load_meta(meta))
    objective, _ = choose_objective(objective, lines)
    tokenizer, settings = _settings(model, template, max_length, max_dynamic_patch)
    failed = inspect(lines, parse_index(index, len(lines)), tokenizer, settings, as_json, save_tiles,
                     color and sys.stdout.isatty(), objective=objective)
    raise typer.Exit(1 if failed else 0)


@data_app.command("convert")
def data_convert(
    src: str = typer.Argument(..., help="input file (json, jsonl, ShareGPT, OpenAI messages or preference pairs)"),
    dst: str = typer.Argument(..., help="output .jsonl file in the InternVL format"),
    fmt: str = typer.Option("jsonl", "--from", help="json | jsonl | sharegpt | openai | pairs (preference pairs of "
                            "TRL, LLaMA-Factory or ms-swift -> question / chosen / rejected)"),
    keep_system: Optional[bool] = typer.Option(None, "--keep-system/--drop-system",
                                               help="keep a leading system turn (default: official behaviour)"),
    skip_invalid: bool = typer.Option(False, help="write unconvertible records to DST.rejected.jsonl"),
    media_root: Optional[str] = typer.Option(None, help="make media paths relative to this folder"),
    source_root: Optional[str] = typer.Option(None, help="folder relative media paths start from"),
    images_dir: Optional[str] = typer.Option(None, help="where decoded data: URL images go (openai, pairs)"),
):
    """Convert json/jsonl (official tools) or ShareGPT / OpenAI-messages data to InternVL JSONL, and
    preference pairs (--from pairs) to the official preference format."""
    from .data.convert import convert

    options = {k: v for k, v in dict(media_root=media_root, source_root=source_root, images_dir=images_dir).items()
               if v is not None}
    stats = convert(src, dst, fmt, keep_system=keep_system, skip_invalid=skip_invalid, **options)
    print(stats.summary())


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(ctx: typer.Context, config: str = typer.Argument(..., help="YAML config; then section.key=value overrides")):
    """Train LoRA adapters (the data is audited first).

    After CONFIG, any field can be overridden as section.key=value, values read as YAML
    (numbers, true/false, lists as \\[a, b]), e.g.

        internvl-lora train run.yaml train.lr=1e-4 data.max_length=4096

    Every field and its meaning: docs/training.md.
    """
    from .config import load_config

    cfg = load_config(config, list(ctx.args))  # before importing torch: a config mistake is reported at once
    from .train import train as run_train

    run_train(cfg)


@app.command()
def merge(
    adapter: str = typer.Argument(..., help="adapter folder written by train (RUN/adapter)"),
    out: str = typer.Argument(..., help="output folder for the merged checkpoint"),
    base: Optional[str] = typer.Option(None, help="base checkpoint (default: the one recorded in the adapter)"),
    dtype: Optional[str] = typer.Option(None, help="bfloat16 | float16 | float32 (default: the base's)"),
    overwrite: bool = typer.Option(False, help="replace OUT if it exists"),
    streaming: bool = typer.Option(False, help="merge shard by shard without building the model (large models)"),
    check: bool = typer.Option(True, help="run the logits parity check before the output is published"),
):
    """Merge adapters into a standalone checkpoint in the base's format, with a parity check."""
    from .merge import merge as run_merge

    report = run_merge(adapter, out, base=base, dtype=dtype, overwrite=overwrite, streaming=streaming, check=check)
    print(json.dumps(report, indent=2))


@app.command()
def chat(
    model: str = typer.Argument(..., help="merged or base checkpoint (either format), or an adapter folder"),
    question: Optional[str] = typer.Argument(None, help="the question; omit for an interactive session"),
    image: List[str] = typer.Option([], "--image", help="image file (repeat for several)"),
    video: Optional[str] = typer.Option(None, "--video", help="video file, frame folder or GIF"),
    max_new_tokens: int = typer.Option(256, min=1, help="longest answer in tokens"),
    dtype: Optional[str] = typer.Option(None, help="bfloat16 | float32 (default: bf16 on a GPU, fp32 on a CPU)"),
    base: Optional[str] = typer.Option(None, help="base checkpoint for an adapter folder"),
):
    """Ask a question about images or a video; greedy decoding; only the answer goes to stdout."""
    from .chat import run_chat

    run_chat(model, question, image, video, max_new_tokens, dtype, base)


@app.command()
def validate(
    base: str = typer.Option(..., help="base checkpoint"),
    tuned: str = typer.Option(..., help="merged checkpoint or adapter folder"),
    data: str = typer.Option(..., help="held-out meta JSON or .jsonl"),
    out: str = typer.Option("validation", help="output folder (validation.json, report.html)"),
    batch_size: int = typer.Option(8, min=1, help="samples generated together (left padding)"),
    max_new_tokens: int = typer.Option(64, min=1, help="longest answer in tokens"),
    limit: Optional[int] = typer.Option(None, min=1, help="only the first N samples"),
    blank_images: bool = typer.Option(False, help="also run the tuned model with every image blanked"),
):
    """Compare base and tuned on held-out samples: exact match, ANLS, ROUGE-L, and an HTML report."""
    from .validate import validate as run_validate

    summary = run_validate(base, tuned, data, out, batch_size, max_new_tokens, limit, blank_images)
    print(json.dumps(summary, indent=2))
    print(f"report: {Path(out) / 'report.html'}")


@app.command()
def convert(
    src: str = typer.Argument(..., help="checkpoint folder (or adapter folder with --adapter)"),
    dst: str = typer.Argument(..., help="output folder"),
    to: str = typer.Option(..., "--to", help="hf | original"),
    reference: Optional[str] = typer.Option(None, help="an original checkpoint whose config/.py files to use (hf -> original)"),
    adapter: bool = typer.Option(False, help="SRC is a LoRA adapter folder, not a checkpoint"),
    base: Optional[str] = typer.Option(None, help="for --adapter: the checkpoint whose config describes the layout"),
    without_code: bool = typer.Option(False, help="hf -> original with no *.py remote code to copy: write weights, "
                                                  "config and tokenizer only (the official code cannot load it)"),
):
    """Convert a checkpoint (or a LoRA adapter) between the original and the -hf format."""
    from .internvl.format.adapter import convert_adapter
    from .internvl.format.save import convert_checkpoint

    if adapter:
        cfg_path = Path(base or src) / "config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
        print(convert_adapter(src, dst, to, cfg))
    else:
        print(convert_checkpoint(src, dst, to, reference_original=reference, without_code=without_code))


@app.command()
def demo(
    out: str = typer.Option("demo_out", help="output folder"),
    prepare_only: Optional[str] = typer.Option(None, help="only write model, data and DIR/train.yaml into DIR"),
    n_train: Optional[int] = typer.Option(None, help="synthetic training samples (default 1600; 800 pairs with --objective mpo)"),
    epochs: Optional[float] = typer.Option(None, help="override the demo's number of epochs"),
    objective: str = typer.Option("sft", help="sft: supervised demo | mpo: preference (MPO) demo on preference pairs"),
):
    """Run the whole workflow on a tiny InternVL built locally and a synthetic dataset (CPU, minutes)."""
    from .demo import prepare, run, run_preference

    if objective not in ("sft", "mpo"):
        raise UserError(f"--objective must be sft or mpo, got {objective!r}")
    n_train = n_train or (800 if objective == "mpo" else 1600)
    if prepare_only:
        path = prepare(prepare_only, n_train=n_train, objective=objective)
        print(f"wrote {path}\nnext: internvl-lora train {path}")
        return
    if objective == "mpo":
        run_preference(out, n_train=n_train, epochs=epochs)
    else:
        run(out, n_train=n_train, epochs=epochs)


# Errors of the storage, not of the program: one message naming the path and what to do, exit 2.
STORAGE_ERRORS = {
    errno.ENOSPC: "no space left on the device: free some space or choose a folder on another disk",
    errno.EDQUOT: "disk quota exceeded: free some space or choose a folder on another disk",
    errno.EROFS: "read-only file system: choose a writable folder",
    errno.EACCES: "permission denied: check the permissions or choose a folder you can write to",
    errno.EPERM: "operation not permitted: check the permissions or choose a folder you can write to",
}


def storage_error_message(e: OSError) -> str | None:
    """The message for a storage error (disk full, read-only, permissions); None for any other error."""
    advice = STORAGE_ERRORS.get(e.errno)
    if advice is None:
        return None
    where = e.filename if e.filename is not None else "a file"
    return f"{where}: {advice} ({e.strerror or e})"


def main() -> None:
    try:
        app()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        message = storage_error_message(e)
        if message is None:
            raise  # a bug or an unexpected condition: keep the traceback
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
