#!/usr/bin/env python3
"""Where do two queues that should be identical part? Reads a ComfyUI server log written with
``STEADYDANCER_TRACE_PASSES=1`` (one ``SteadyDancer pass:`` line per DiT pass: batch, timesteps, float64 sums of
every input and of the output; nodes/native_model.py), splits it into queues at ComfyUI's ``got prompt`` lines
and compares two of them pass by pass (issue 15: the official GPU workflow's queue-to-queue difference).

    python bench/pass_trace.py SERVER_LOG [--queues A,B]     # default: the last two queues (warm, again)

Prints each queue's passes (count, batch sizes) and the first pass where the two differ, naming the fields:
inputs equal but ``out`` different = the DiT pass itself is not reproducible at that batch; ``x`` different with
equal conditioning = an earlier pass (or the sampler between passes) already differed; a conditioning field
(``pose``, ``ref_x``, ``context`` ...) different = the conditioning reached the DiT differently.
A sum is a digest, not a proof: equal sums almost surely mean equal tensors for real-valued data, but a batch
whose items were reordered would show equal input sums (its output sum would then differ only by rounding).
"""
from __future__ import annotations

import argparse
import re
import sys

_PASS = re.compile(r"SteadyDancer pass: (.*)$")
_PROMPT = re.compile(r"\bgot prompt\b")


def parse(text: str) -> list[list[dict]]:
    """The passes of each queue, in log order: one list of {field: value string} per ``got prompt`` that ran a
    traced DiT pass (prompts without one, e.g. ComfyUI's fully cached ones, are left out)."""
    queues: list[list[dict]] = []
    for line in text.splitlines():
        if _PROMPT.search(line):
            queues.append([])
            continue
        m = _PASS.search(line)
        if m is None:
            continue
        if not queues:
            queues.append([])
        queues[-1].append(dict(kv.split("=", 1) for kv in m.group(1).split()))
    return [q for q in queues if q]


def first_difference(a: list[dict], b: list[dict]):
    """(pass index, [fields that differ]) of the first differing pass, or None when all compared passes match.
    A different number of passes is reported at the first pass one queue lacks (fields ['missing'])."""
    for i, (pa, pb) in enumerate(zip(a, b)):
        fields = [k for k in pa if pa.get(k) != pb.get(k)] + [k for k in pb if k not in pa]
        if fields:
            return i, fields
    if len(a) != len(b):
        return min(len(a), len(b)), ["missing"]
    return None


def report(queues: list[list[dict]], pick: tuple[int, int]) -> str:
    lines = ["| queue | passes | batches |", "|---|---:|---|"]
    for q, passes in enumerate(queues):
        lines.append(f"| {q} | {len(passes)} | {' '.join(p.get('batch', '?') for p in passes)} |")
    ia, ib = pick
    a, b = queues[ia], queues[ib]
    d = first_difference(a, b)
    if d is None:
        lines.append(f"\nqueues {ia} and {ib}: all {len(a)} passes identical (inputs and outputs)")
    else:
        i, fields = d
        lines.append(f"\nqueues {ia} and {ib}: first difference at pass {i} (of {len(a)} / {len(b)}): "
                     f"{', '.join(fields)}")
        for name, passes in ((ia, a), (ib, b)):
            if i < len(passes):
                p = passes[i]
                lines.append(f"  queue {name}: " + " ".join(f"{k}={p[k]}" for k in p if k in fields + ["batch", "t"]))
        if fields == ["out"]:
            lines.append("  -> the same inputs gave a different output: this DiT pass is not reproducible")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", help="ComfyUI server log with STEADYDANCER_TRACE_PASSES=1")
    ap.add_argument("--queues", help="the two queues to compare, 0-based, e.g. 1,2 (default: the last two)")
    args = ap.parse_args(argv)
    with open(args.log, encoding="utf-8", errors="replace") as f:
        queues = parse(f.read())
    if len(queues) < 2:
        print(f"{args.log}: {len(queues)} queue(s) with traced passes; need two "
              "(was the server started with STEADYDANCER_TRACE_PASSES=1?)")
        return 1
    pick = tuple(int(v) for v in args.queues.split(",")) if args.queues else (len(queues) - 2, len(queues) - 1)
    print(report(queues, pick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
