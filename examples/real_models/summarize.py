"""The table of docs/real_models.md §5 from compare.py's JSON (compare_methods.sh writes it).

    python examples/real_models/summarize.py runs/real-compare/compare.json

One row per method: mean ± the half-width of the 95 % confidence interval over seeds (Student t) of
held-out accuracy, agreement with the teacher and exact RKL(S‖T); the share of the untouched student's
gap to the teacher that the method recovered, ``(acc − acc_untouched) / (acc_teacher − acc_untouched)``;
and differences paired by seed against OPD.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from opd.sweep.stats import Summary, paired_difference, summarize

METHODS = {"opd": "OPD (default)", "sft": "SFT on teacher samples", "warm": "warm start alone (10 SFT steps)",
           "warm-opd": "warm start + OPD (10 + 20 steps)"}
KEYS = ("accuracy", "agreement", "rkl")


def fmt(s: Summary, digits: int = 3) -> str:
    return f"{s.mean:.{digits}f}" if s.n < 2 else f"{s.mean:.{digits}f} ± {s.ci:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", type=Path)
    a = p.parse_args()
    rows = json.loads(a.json.read_text())
    teacher, untouched = rows[0], rows[1]
    by: dict[str, dict[int, dict]] = {}
    for r in rows[2:]:
        m = re.search(r"/([a-z-]+)-seed(\d+)/final$", r["model"])
        if m:
            by.setdefault(m.group(1), {})[int(m.group(2))] = r
    gap = teacher["accuracy"] - untouched["accuracy"]
    print("| model | seeds | accuracy | agreement with the teacher | RKL(S‖T) per token | gap recovered |")
    print("|---|---|---|---|---|---|")
    print(f"| pruned student, untouched | – | {untouched['accuracy']:.3f} | {untouched['agreement']:.3f} | "
          f"{untouched['rkl']:.3f} | 0 |")
    for key, label in METHODS.items():
        runs = by.get(key, {})
        if not runs:
            continue
        seeds = sorted(runs)
        stats = {k: summarize([runs[s][k] for s in seeds]) for k in KEYS}
        recovered = summarize([(runs[s]["accuracy"] - untouched["accuracy"]) / gap for s in seeds])
        print(f"| {label} | {len(seeds)} | {fmt(stats['accuracy'])} | {fmt(stats['agreement'])} | "
              f"{fmt(stats['rkl'])} | {fmt(recovered, 2)} |")
    print(f"| teacher | – | {teacher['accuracy']:.3f} | 1 | 0 | 1 |")
    opd = by.get("opd", {})
    for key in ("sft", "warm-opd"):
        other = by.get(key, {})
        seeds = sorted(set(opd) & set(other))
        if len(seeds) < 2:
            continue
        parts = []
        for k in KEYS:
            d = paired_difference({s: opd[s][k] for s in seeds}, {s: other[s][k] for s in seeds})
            parts.append(f"{k} {d.mean:+.3f} ± {d.ci:.3f}")
        print(f"\nOPD − {METHODS[key]}, paired by seed (n = {len(seeds)}): " + ", ".join(parts))


if __name__ == "__main__":
    main()
