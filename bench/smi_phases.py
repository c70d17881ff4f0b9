"""SM clock, power and throttle reasons per phase of a device call, from nvidia-smi samples and the call's marks.

    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
        --format=csv,noheader -lms 250 > OUT/smi.csv &
    echo "\"main at $SECONDS $(date +%H:%M:%S.%N)\"" >> OUT/bench.jsonl   # a mark before each phase
    python3 bench/smi_phases.py OUT/smi.csv OUT/bench.jsonl

A phase runs from its mark to the next. Only samples drawing more than --loaded watts count (the load and
start of each process draw ~70-120 W and would pull the medians down). Throttle reasons are nvidia-smi's
bit mask: 0x4 = software power cap (the card at its power limit), 0x0 = none.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics


def _seconds(clock: str) -> float:
    h, m, s = clock.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def read_marks(path: str) -> list[tuple[str, float]]:
    """The quoted "NAME at SECONDS HH:MM:SS.NS" lines of a bench.jsonl, in order."""
    marks = []
    for line in open(path):
        line = line.strip()
        if line.startswith('"'):
            text = json.loads(line)
            marks.append((text.split(" at ")[0], _seconds(text.split()[-1])))
    return marks


def read_samples(path: str) -> list[dict]:
    samples = []
    for line in open(path):
        f = [x.strip() for x in line.split(",")]
        if len(f) < 5 or f[1] == "[N/A]":
            continue
        samples.append({"t": _seconds(f[0].split()[1]), "sm_mhz": int(f[1].split()[0]),
                        "watts": float(f[3].split()[0]), "temp": int(f[4]),
                        "reasons": f[5] if len(f) > 5 else "?"})
    return samples


def _pct(values: list, q: float):
    return sorted(values)[int(q * (len(values) - 1))]


def phases(samples: list[dict], marks: list[tuple[str, float]], loaded: float) -> list[dict]:
    out = []
    for (name, start), (_, end) in zip(marks, marks[1:]):
        busy = [s for s in samples if start <= s["t"] < end and s["watts"] > loaded]
        if not busy:
            continue
        mhz, watts = [s["sm_mhz"] for s in busy], [s["watts"] for s in busy]
        reasons = collections.Counter(s["reasons"] for s in busy)
        out.append({"phase": name, "seconds": round(end - start, 1), "loaded_samples": len(busy),
                    "sm_mhz_median": statistics.median(mhz), "sm_mhz_p10": _pct(mhz, 0.1),
                    "sm_mhz_p90": _pct(mhz, 0.9), "watts_median": round(statistics.median(watts), 1),
                    "watts_max": max(watts), "temp_max": max(s["temp"] for s in busy),
                    "reasons": {k: round(v / len(busy), 2) for k, v in sorted(reasons.items())}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("smi_csv")
    ap.add_argument("marks_jsonl")
    ap.add_argument("--loaded", type=float, default=200.0, help="watts above which a sample counts")
    args = ap.parse_args()
    for row in phases(read_samples(args.smi_csv), read_marks(args.marks_jsonl), args.loaded):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
