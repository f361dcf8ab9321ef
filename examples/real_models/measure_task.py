"""Greedy accuracy of models on the chat_basics families, per family, with the share of completions
cut at ``--max-new-tokens`` (docs/real_models.md).

    python examples/real_models/measure_task.py builtin:smollm2-135m-instruct runs/s10-angular \
        --per-family 20 --max-new-tokens 24

Each MODEL is anything opd loads (a folder, a .gguf file, builtin:smollm2-135m-instruct, a hub id);
prompts are rendered with each model's own chat template. Scoring is opd's held-out evaluation
(:func:`opd.evaluate.evaluate`): greedy decoding, each family's verifier on the text up to the first
end of turn (a completion cut at ``--max-new-tokens`` scores 0). All families are decoded in one
batch; the per-family figures are read from the per-completion scores.
"""

from __future__ import annotations

import argparse
import json
import time

from opd.model_paths import resolve_model_path
from opd.evaluate import evaluate
from opd.models import load_model, load_tokenizer
from opd.tasks.chat_basics import FAMILIES, ChatBasicsTask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("--per-family", type=int, default=20, help="held-out questions per family")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=128, help="prompts per generation batch")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated families")
    p.add_argument("--samples", type=int, default=0, help="print the first N completions of each family")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    families = [f for f in args.families.split(",") if f]
    results = []
    print(f"{'model':<40} {'family':<10} {'accuracy':>8} {'cut':>6} {'mean len':>8} {'n':>4}")
    for name in args.models:
        path = resolve_model_path(name)
        tokenizer, model = load_tokenizer(path), load_model(path)
        task = ChatBasicsTask(tokenizer, families=families, n_eval_per_family=args.per_family)
        examples = task.eval_examples()
        start = time.perf_counter()
        r = evaluate(model, tokenizer, task, examples, max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size, samples=len(examples))
        seconds = time.perf_counter() - start
        rows = list(zip(examples, r.samples, strict=True))
        for family in families + ["all"]:
            mine = [(e, s) for e, s in rows if family in ("all", e.fields["family"])]
            acc = sum(s["score"] for _, s in mine) / len(mine)
            cut = sum(bool(s["truncated"]) for _, s in mine) / len(mine)
            length = sum(len(s["token_ids"]) for _, s in mine)
            print(f"{name:<40} {family:<10} {acc:8.3f} {cut:6.3f} {length / len(mine):8.2f} {len(mine):4d}", flush=True)
            results.append({"model": name, "family": family, "accuracy": acc, "cut": cut, "n": len(mine),
                            "max_new_tokens": args.max_new_tokens})
            for _, s in mine[:args.samples] if family != "all" else []:
                print(f"      {'✓' if s['score'] >= 1 else '✗'} {s['completion']!r}")
        print(f"{name}: {len(examples)} prompts decoded in {seconds:.0f} s (overall accuracy {r.accuracy:.3f}, "
              f"cut {r.truncation_rate:.3f})", flush=True)
        del model
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
