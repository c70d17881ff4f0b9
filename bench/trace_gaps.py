"""Where the GPU waits: idle gaps of a Chrome trace (torch.profiler, with Python stacks), attributed to the
Python code that launched the kernel after each gap.

    python bench/trace_gaps.py OUT/trace.json.gz [--kernel SUBSTRING]
    python bench/trace_gaps.py OUT/timeline.json.gz      # a CUDA-only trace (train_step_bench --timeline)

Prints GPU busy vs wall time over the traced step, then the idle time by the innermost frame of our code
(internvl_lora), transformers, peft, liger or torch that was running when the late kernel was launched.
--kernel prints the Python stacks that launched kernels whose name contains SUBSTRING. A trace without
host events (CUDA only: the host ran at full speed) names the kernels before and after each gap instead.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json

KEEP = ("internvl_lora", "transformers/", "peft/", "liger_kernel", "accelerate/", "torch/optim", "torch/nn/utils",
        "train_step_bench")


def load(path):
    with (gzip.open(path) if path.endswith(".gz") else open(path)) as f:
        return json.load(f)["traceEvents"]


def ops_index(events):
    """CPU operator events (aten::...) per thread, sorted by start: what launched a kernel on a thread without
    Python frames (the autograd engine's backward)."""
    by = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "cpu_op":
            by[e["tid"]].append(e)
    return {tid: (sorted(ops, key=lambda e: e["ts"]), sorted(e["ts"] for e in ops)) for tid, ops in by.items()}


def ops_at(index, tid, t, depth=40):
    """Names of the CPU operators enclosing time t on thread tid, outermost first."""
    ops, starts = index.get(tid) or ([], [])
    i = bisect.bisect_right(starts, t)
    return [e["name"] for e in sorted((e for e in ops[max(0, i - depth * 50):i] if e["ts"] <= t <= e["ts"] + e["dur"]),
                                      key=lambda e: e["ts"])]


def stacks_index(events):
    """Python frames per thread, sorted by start, for 'which frames enclose time t on thread tid'. The
    profiler gives Python frames the thread id 0 for the main thread; the autograd engine's thread keeps
    its system id (the same as its CUDA launches)."""
    by = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "python_function":
            by[e["tid"]].append(e)
    index = {}
    for tid, frames in by.items():
        frames.sort(key=lambda e: e["ts"])
        index[tid] = (frames, [e["ts"] for e in frames])
    return index


def frames_at(index, tid, t, depth=400):
    """Enclosing frames at time t on thread tid (or the main thread), outermost first."""
    py, starts = index.get(tid) or index.get(0) or ([], [])
    i = bisect.bisect_right(starts, t)
    out = [e for e in py[max(0, i - depth * 50):i] if e["ts"] <= t <= e["ts"] + e["dur"]]
    return sorted(out, key=lambda e: e["ts"])


def interesting(frames, n=3):
    names = [f["name"] for f in frames if any(k in f["name"] for k in KEEP)]
    return " < ".join(x.split("site-packages/")[-1] for x in reversed(names[-n:])) or (frames[-1]["name"] if frames else "?")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--kernel", default="")
    ap.add_argument("--min-gap-us", type=float, default=20.0)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    ev = load(a.trace)
    gpu = sorted((e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in ev if e.get("cat") in ("cuda_runtime", "cuda_driver")
                and "correlation" in e.get("args", {})}
    index = stacks_index(ev)
    t0, t1 = gpu[0]["ts"], max(e["ts"] + e["dur"] for e in gpu)
    busy, end, gaps = 0.0, t0, []
    for e in gpu:
        s, f = e["ts"], e["ts"] + e["dur"]
        if s > end:
            gaps.append((s - end, e))
        busy += max(0.0, f - max(s, end))
        end = max(end, f)
    wall = t1 - t0
    print(f"window {wall / 1e3:.1f} ms, GPU busy {busy / 1e3:.1f} ms ({100 * busy / wall:.0f} %), "
          f"idle {(wall - busy) / 1e3:.1f} ms in {len(gaps)} gaps")
    if not index:  # no Python frames: the kernels on either side of each gap (and the host operator that
        # launched the late one, where the trace has host operators)
        ops = ops_index(ev)
        prev = {id(b): a for a, b in zip(gpu, gpu[1:])}
        by = collections.Counter()
        count = collections.Counter()
        for gap, e in gaps:
            if gap < a.min_gap_us:
                by["(gaps below %g us)" % a.min_gap_us] += gap
                continue
            before = prev.get(id(e), {}).get("name", "?")[:60]
            key = f"{before}  ->  {e['name'][:60]}"
            launch = launches.get(e.get("args", {}).get("correlation"))
            if ops and launch:
                key += f"  [ops: {' > '.join(ops_at(ops, launch['tid'], launch['ts'])[-3:])}]"
            by[key] += gap
            count[key] += 1
        for where, us in by.most_common(a.top):
            print(f"{us / 1e3:8.1f} ms  x{count[where]:<4d} {where}")
        return
    by = collections.Counter()
    for gap, e in gaps:
        if gap < a.min_gap_us:
            by["(gaps below %g us)" % a.min_gap_us] += gap
            continue
        launch = launches.get(e["args"].get("correlation"))
        where = interesting(frames_at(index, launch["tid"], launch["ts"])) if launch else "?"
        by[where] += gap
    for where, us in by.most_common(a.top):
        print(f"{us / 1e3:8.1f} ms  {where}")
    if a.kernel:
        seen, count = collections.Counter(), collections.Counter()
        ops = ops_index(ev)
        for e in gpu:
            if a.kernel in e["name"]:
                launch = launches.get(e["args"].get("correlation"))
                fr = frames_at(index, launch["tid"], launch["ts"]) if launch else []
                op = " > ".join(ops_at(ops, launch["tid"], launch["ts"])[-3:]) if launch else "?"
                key = f"{interesting(fr, 6)}  [ops: {op}]"
                seen[key] += e["dur"]
                count[key] += 1
        for where, us in seen.most_common(12):
            print(f"[{a.kernel}] {us / 1e3:.2f} ms x{count[where]}  {where}")


if __name__ == "__main__":
    main()
