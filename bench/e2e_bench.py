"""End to end: the real `internvl-lora train` command on real-format data vs our bare training step.

    python bench/e2e_bench.py --make-data DATA --samples 600 [--image-scale 1] [--gen-workers 16]
    python bench/e2e_bench.py --make-model MODEL --size 1b|8b|tiny --tokenizer TOKDIR
    python bench/e2e_bench.py --run --data DATA --model MODEL --out OUT --size 1b --budget 20480 --steps 40 --workers 8
    python bench/e2e_bench.py --loader-only --data DATA --model MODEL [--worker-counts 1,2,4,8]

--make-data / --make-model: the inputs (bench/e2e_data.py says what they hold). The model folder is a
random-weight -hf checkpoint at the real shape, with the real tokenizer of TOKDIR (e.g. InternVL2_5-1B-MPO's).

--run: `python -m internvl_lora.cli train CONFIG` as a subprocess (OUT/config.yaml: packing, token budget
--budget (also data.max_length), no activation checkpointing, train.fused, Liger when importable on a
GPU, --steps optimizer steps of one micro-batch, a log record every step, one checkpoint save halfway,
data.num_workers --workers, the official pixel path, data.max_num_frames 16 so a clip fits the 8B's
budget). From its metrics.jsonl and its timestamped output (OUT/train_log.txt): tokens/s over the steady
part (the steps after the first 20 %, a checkpoint save included), time to the first step from the
process start, and the audit's time. Then, in this process, bench/train_step_bench.py's `run` (our
trainer on a dataset that is already in memory: random tiles, no loader work) on the SAME samples: the
token ids and tile counts of the data set's own encoding (seed 0 as the run), the first ones that fill
about --steps + 3 micro-batches. Prints one JSON line: both tokens/s and e2e / step.

--loader-only: the data loader of training (the data set and packed collator of the training command,
official pixels, pinned memory on a GPU) alone: samples/s and samples/s per worker for each worker count,
and the data audit's time per 1,000 samples (in worker processes, as training runs it, and in one process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

STEADY_SKIP = 0.2  # share of the first steps left out of the steady part (start-up, warm-up)
SPEC_TEMPLATE = "internvl2_5"


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def liger_ok() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None and cuda()


def write_config(a, out: Path) -> Path:
    import yaml

    steps = a.steps
    cfg = {
        "model": {"path": str(Path(a.model).resolve())},
        "data": {"meta": str((Path(a.data) / "meta.json").resolve()), "packing": True, "max_length": a.budget,
                 "max_tokens_per_batch": a.budget, "num_workers": a.workers, "max_num_frames": 16},
        "train": {"output_dir": str((out / "run").resolve()), "max_steps": steps, "grad_accum": 1, "logging_steps": 1,
                  "save_steps": steps // 2 + 1, "save_total_limit": 1, "gradient_checkpointing": False, "fused": True,
                  "liger": liger_ok(), "report_to": [], "overwrite": True, "seed": 0},
    }
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_training(a, out: Path) -> dict:
    """The training command as a subprocess; every output line timestamped from the process start."""
    config = write_config(a, out)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "internvl_lora.cli", "train", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    with open(out / "train_log.txt", "w") as log:
        for line in proc.stdout:
            t = time.perf_counter() - t0
            lines.append((t, line.rstrip("\n")))
            log.write(f"{t:9.3f} {line}")
            log.flush()
    rc = proc.wait()
    total = time.perf_counter() - t0
    if rc:
        tail = "\n".join(x for _, x in lines[-30:])
        raise SystemExit(f"internvl-lora train failed (exit {rc}); the end of {out / 'train_log.txt'}:\n{tail}")
    return {"lines": lines, "total_s": total}


def steady(out: Path, lines: list) -> dict:
    """Tokens/s over the steps after the first STEADY_SKIP share: tokens of a step from its trained tokens and
    label coverage (exact up to the coverage's rounding), time from the log lines' timestamps."""
    records = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in records if "loss" in r]
    stamps = {}
    for t, line in lines:
        if line.startswith("step ") and "/" in line.split()[1]:
            stamps.setdefault(int(line.split()[1].split("/")[0]), t)
    prev, tokens_by_step = 0, {}
    for r in train:
        d = r["trained_tokens"] - prev
        prev = r["trained_tokens"]
        tokens_by_step[r["step"]] = d / r["label_coverage"] if r["label_coverage"] else 0.0
    steps = [r["step"] for r in train]
    first = steps[min(len(steps) - 1, max(1, round(STEADY_SKIP * len(steps)))) - 1]  # the window starts after it
    window = [s for s in steps if s > first]
    t_first, t_last = stamps.get(first), stamps.get(steps[-1])
    if t_first is None or t_last is None or not window:  # fall back on the records' own clock (0.1 s steps)
        by = {r["step"]: r for r in train}
        t_first, t_last = by[first]["elapsed_s"], by[steps[-1]]["elapsed_s"]
    tokens = sum(tokens_by_step[s] for s in window)
    by = {r["step"]: r for r in train}
    span = max(t_last - t_first, 1e-9)
    wait = sum(by[s].get("data_wait_s", 0.0) for s in window)
    saves = sum(by[s].get("checkpoint_s", 0.0) for s in window)
    return {"steps": len(steps), "steady_steps": len(window), "steady_tokens": round(tokens),
            "steady_s": round(span, 2), "data_wait_s": round(wait, 2), "data_wait_share": round(wait / span, 3),
            "checkpoint_s": round(saves, 2),
            "step_s": [round(stamps[s] - stamps[p], 3) if s in stamps and p in stamps else
                       round(by[s]["elapsed_s"] - by[p]["elapsed_s"], 1) for p, s in zip(steps, steps[1:])],
            "tokens_per_s": round(tokens / max(t_last - t_first, 1e-9), 1),
            "time_to_first_step_s": round(stamps.get(steps[0], float("nan")), 1),
            "peak_mem_gib": max(r.get("peak_mem_gib", 0.0) for r in train)}


def phases(lines: list) -> dict:
    """Seconds from the process start to the checkpoint inspection line and to the end of the audit report."""
    out = {}
    for i, (t, line) in enumerate(lines):
        if line.startswith("checkpoint ") and "checkpoint_line_s" not in out:
            out["checkpoint_line_s"] = round(t, 1)
            if i + 1 < len(lines):
                out["audit_s"] = round(lines[i + 1][0] - t, 1)  # the audit runs between the two lines
        if line.startswith("speed options") and "model_ready_s" not in out:
            out["model_ready_s"] = round(t, 1)
    return out


def dataset(a, seed: int = 0):
    """The training command's data set for the config of --run (audit included; its time returned)."""
    from internvl_lora.config import load_config
    from internvl_lora.internvl.checkpoint import inspect_checkpoint, load_tokenizer
    from internvl_lora.train import encode_settings, prepare_data

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(write_config(a, out))
    info = inspect_checkpoint(cfg.model.path)
    tokenizer = load_tokenizer(cfg.model.path)
    settings = encode_settings(cfg, info)
    t = time.perf_counter()
    ds, result, _ = prepare_data(cfg, tokenizer, settings, cfg.data.meta, train=True)
    return ds, tokenizer, settings, cfg, time.perf_counter() - t, result


def real_items(ds, tokenizer, budget: int, batches: int, workers: int, vocab: int) -> list:
    """(ids, labels, tiles) of the data set's first samples that fill about BATCHES micro-batches of BUDGET
    tokens, by its own encoding (pixels dropped); ids mapped into the step bench's model: the image token
    to IMG_TOKEN (a text token that equals IMG_TOKEN moves by one), others modulo VOCAB (tiny only)."""
    import torch

    from naive_lora_step import IMG_TOKEN

    img = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    want, n = batches * budget * 0.9, 0  # packing fills micro-batches to about 90 %
    while n < len(ds) and sum(ds.lengths[:n]) < want:
        n += 1
    sub = torch.utils.data.Subset(ds, range(n))
    loader = torch.utils.data.DataLoader(sub, batch_size=None, num_workers=workers)
    def to_vocab(t: int) -> int:
        if t < 0:  # an ignored label
            return t
        return IMG_TOKEN if t == img else (t % vocab if t % vocab != IMG_TOKEN else IMG_TOKEN + 1)

    items = []
    for x in loader:
        items.append(([to_vocab(t) for t in x["input_ids"].tolist()], [to_vocab(t) for t in x["labels"].tolist()],
                      int(sum(x["num_tiles"])) if x["num_tiles"] else 0))
    return items


def run(a) -> dict:
    import torch

    from naive_lora_step import LLM
    from train_step_bench import run as step_run

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    e2e = run_training(a, out)
    result = {"size": a.size, "budget": a.budget, "workers": a.workers, "liger": liger_ok(),
              "e2e": {**steady(out, e2e["lines"]), **phases(e2e["lines"]), "process_s": round(e2e["total_s"], 1)}}
    print(json.dumps(result), file=sys.stderr, flush=True)
    ds, tokenizer, *_ = dataset(a)
    items = real_items(ds, tokenizer, a.budget, a.steps + 3, a.workers, LLM[a.size]["vocab_size"])
    step = step_run(a.size, "packed", 4, a.steps, 6, 0, liger_ok(), str(out / "step_bench"), budget=a.budget,
                    items=items)
    result["step_bench"] = {k: step[k] for k in ("steps", "real_tokens_per_s", "model_tflops", "peak_gib", "options")}
    result["step_bench"]["samples"] = "the data set's first %d samples (real token ids and tile counts)" % len(items)
    result["e2e_over_step"] = round(result["e2e"]["tokens_per_s"] / max(step["real_tokens_per_s"], 1e-9), 3)
    if cuda():
        torch.cuda.empty_cache()
    return result


def loader_only(a) -> dict:
    import torch

    from internvl_lora.data.collate import HostSide, data_collator

    a.out = a.out or str(Path(a.data) / "loader_bench")
    ds, tokenizer, settings, cfg, audit_s, result = dataset(a)
    collate = HostSide(data_collator(tokenizer, settings, False, packing=True))
    n = min(len(ds), a.loader_samples)
    from internvl_lora.data.audit import audit, audit_workers
    from internvl_lora.data.meta import load_meta

    t = time.perf_counter()
    audit(load_meta(cfg.data.meta), tokenizer, settings, workers=1)
    serial_s = time.perf_counter() - t
    out = {"samples": n, "dataset_samples": len(ds), "audit_s": round(audit_s, 2), "audit_workers": audit_workers(),
           "audit_s_per_1000_samples": round(audit_s / max(1, len(result.lines)) * 1000, 2),
           "audit_one_process_s_per_1000_samples": round(serial_s / max(1, len(result.lines)) * 1000, 2),
           "tiles_in_data": result.tiles, "pin_memory": cuda(), "per_workers": {}}
    for w in (int(x) for x in a.worker_counts.split(",")):
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=4, num_workers=w,
                                             collate_fn=collate, pin_memory=cuda(),
                                             prefetch_factor=2 if w else None)
        t0 = time.perf_counter()
        t_first, seen = None, 0
        for b in loader:
            seen += 4
            if t_first is None:
                t_first, first = time.perf_counter(), seen
        dt = time.perf_counter() - t0
        steady_s = time.perf_counter() - t_first
        sps = (n - first) / max(steady_s, 1e-9)
        out["per_workers"][w] = {"samples_per_s": round(n / dt, 1), "steady_samples_per_s": round(sps, 1),
                                 "samples_per_s_per_worker": round(sps / max(w, 1), 1),
                                 "first_batch_s": round(t_first - t0, 2)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make-data", metavar="DIR")
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--image-scale", type=float, default=1.0, help="scale of every picture (0.25 for a CPU check)")
    ap.add_argument("--gen-workers", type=int, default=os.cpu_count() or 1, help="processes writing the data set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--make-model", metavar="DIR")
    ap.add_argument("--tokenizer", metavar="DIR", help="tokenizer files (InternVL2_5-1B-MPO's) for --make-model")
    ap.add_argument("--size", default="1b", choices=["tiny", "1b", "2b", "8b"])
    ap.add_argument("--run", action="store_true")
    ap.add_argument("--loader-only", action="store_true")
    ap.add_argument("--data", metavar="DIR")
    ap.add_argument("--model", metavar="DIR")
    ap.add_argument("--out", metavar="DIR")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--budget", type=int, default=16384, help="tokens per micro-batch (also data.max_length)")
    ap.add_argument("--workers", type=int, default=8, help="data.num_workers of the run")
    ap.add_argument("--worker-counts", default="1,2,4,8", help="--loader-only: worker counts to measure")
    ap.add_argument("--loader-samples", type=int, default=200, help="--loader-only: samples per worker count")
    a = ap.parse_args(argv)
    if a.make_data:
        from e2e_data import make_data

        t = time.perf_counter()
        kinds = make_data(a.make_data, a.samples, a.seed, a.image_scale, a.gen_workers)
        print(json.dumps({"data": a.make_data, "samples": a.samples, "kinds": kinds, "seconds": round(time.perf_counter() - t, 1)}))
    if a.make_model:
        if not a.tokenizer:
            ap.error("--make-model needs --tokenizer DIR")
        from e2e_data import make_model

        t = time.perf_counter()
        info = make_model(a.make_model, a.size, a.tokenizer, "cuda" if cuda() else "cpu")
        print(json.dumps({**info, "seconds": round(time.perf_counter() - t, 1)}))
    if a.run or a.loader_only:
        if not (a.data and a.model):
            ap.error("--run and --loader-only need --data and --model")
        if a.run and not a.out:
            ap.error("--run needs --out")
        print(json.dumps(run(a) if a.run else loader_only(a)), flush=True)


if __name__ == "__main__":
    main()
