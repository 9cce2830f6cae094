#!/usr/bin/env python3
"""Compares two JSONL output streams of ces-stream replay: same events in the
same order, numbers equal to 0.01 (the spec's tolerance), everything else equal.
The spec leaves the order of outputs within one sweep free, so each run of
consecutive outputs with the same `at` is compared in customer order (each
customer's own outputs keep their order).
Usage: compare_outputs.py EXPECTED ACTUAL; exits 1 and prints the first
differences when they differ."""
import json
import sys


def same(a, b, path=""):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return [] if abs(a - b) <= 0.0100001 else [f"{path}: {a} != {b}"]
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                # A contribution at the 0.005 edge may be printed by one side only.
                v = a.get(k, b.get(k))
                if path.endswith("contributions") and isinstance(v, (int, float)) and abs(v) <= 0.01:
                    continue
                diffs.append(f"{path}.{k}: only in {'expected' if k in a else 'actual'}")
            else:
                diffs += same(a[k], b[k], f"{path}.{k}")
        return diffs
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def canonical(outputs):
    """Stable-sorts each run of outputs with the same `at` by customer id."""
    result, run = [], []
    for o in outputs:
        if run and run[0].get("at") != o.get("at"):
            result += sorted(run, key=lambda x: x.get("customer_id", ""))
            run = []
        run.append(o)
    return result + sorted(run, key=lambda x: x.get("customer_id", ""))


def main():
    with open(sys.argv[1]) as f:
        expected = [json.loads(l) for l in f if l.strip()]
    with open(sys.argv[2]) as f:
        actual = [json.loads(l) for l in f if l.strip()]
    expected, actual = canonical(expected), canonical(actual)
    problems = []
    if len(expected) != len(actual):
        problems.append(f"{len(expected)} expected lines, {len(actual)} actual")
    for i, (e, a) in enumerate(zip(expected, actual), 1):
        for d in same(e, a):
            problems.append(f"line {i}{d}")
        if len(problems) > 20:
            break
    if problems:
        print("\n".join(problems[:20]))
        sys.exit(1)
    print(f"{len(actual)} outputs agree")


if __name__ == "__main__":
    main()
