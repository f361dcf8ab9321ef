"""How often ``opd doctor``'s "would fire" predictions match a real 50-step run's detectors.

    python bench/doctor_agreement.py [--steps 50] [--threads 1]

For every pair of :data:`opd.doctor.agreement.PAIRS` (the demo, the four case tasks, the chat and
cross-tokenizer pairs, and configurations built with bad settings on purpose) it runs the doctor
and a real run, and prints one row per pair and the agreement rate over pairs × detectors.
docs/doctor.md quotes its output.
"""

from __future__ import annotations

import argparse
import time

from opd.doctor.agreement import PAIRS, check_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    extra = [f"train.threads={args.threads}"]
    total = agree = 0
    print(f"| pair | predicted | fired in a {args.steps}-step run | agree | seconds |")
    print("|---|---|---|---|---|")
    for name, (_, overrides) in PAIRS.items():
        tic = time.time()
        r = check_pair(name, overrides, steps=args.steps, extra=extra)
        total += len(r.detectors)
        agree += r.agreements
        print(f"| {name} | {', '.join(sorted(r.predicted)) or '–'} | {', '.join(sorted(r.fired)) or '–'} | "
              f"{r.agreements}/{len(r.detectors)} | {time.time() - tic:.0f} |", flush=True)
    print(f"\nagreement: {agree}/{total} = {agree / max(total, 1):.1%} (pairs × detectors)")


if __name__ == "__main__":
    main()
