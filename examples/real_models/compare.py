"""Score models against the real teacher on the held-out chat_basics questions (docs/real_models.md §5).

    python examples/real_models/compare.py students/s26-angular runs/rm/opd-seed0/final ... \
        --teacher builtin:smollm2-135m-instruct --json runs/rm/compare.json

For the teacher and each MODEL (greedy decoding, ``--max-new-tokens``, the held-out questions of the
default families, each model with its own chat template):

* **accuracy**: the family's verifier on the completion up to its first end of turn (a completion
  cut at ``--max-new-tokens`` scores 0), as in training's held-out evaluation (:mod:`opd.evaluate`);
* **agreement**: the share of questions whose completion text (special tokens kept, so the stop
  token counts) is exactly the teacher's greedy completion;
* **RKL(S‖T)**: the exact reverse KL over the whole vocabulary,
  ``Σ_v π_S(v|s_t) (log π_S(v|s_t) − log π_T(v|s_t))``, at every token of the model's own greedy
  completion (stop token included), averaged over all those tokens. Unlike the training loop's
  held-out ``teacher_rkl`` at this vocabulary size (the sampled-token log-ratio on greedy tokens,
  :func:`opd.evaluate.evaluate`), this is exact;
* **cut**: the share of completions still running at ``--max-new-tokens``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from opd.evaluate import decode_completions, verify_rollouts
from opd.math.divergences import reverse_kl
from opd.model_paths import resolve_model_path
from opd.models import load_model, load_tokenizer
from opd.rollout import Sampling, completion_forward, generate_rollouts
from opd.tasks.chat_basics import ChatBasicsTask
from opd.types import Rollouts


@torch.no_grad()
def exact_rkl(student: torch.nn.Module, teacher: torch.nn.Module, rollouts: Rollouts) -> tuple[float, int]:
    """Sum over completion tokens of the full-vocabulary RKL(student ‖ teacher), and the token count."""
    args = (rollouts.prompt_ids_BP, rollouts.prompt_mask_BP, rollouts.completion_ids_BT, rollouts.completion_mask_BT)
    s_logp = torch.log_softmax(completion_forward(student, *args).float(), dim=-1)
    t_logp = torch.log_softmax(completion_forward(teacher, *args).float(), dim=-1)
    mask = rollouts.completion_mask_BT.bool()
    return float(reverse_kl(s_logp, t_logp)[mask].sum()), int(mask.sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="MODEL", help="student folders (or anything opd loads)")
    p.add_argument("--teacher", default="builtin:smollm2-135m-instruct")
    p.add_argument("--per-family", type=int, default=14, help="held-out questions per family")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()

    t_path = resolve_model_path(args.teacher)
    tokenizer = load_tokenizer(t_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    teacher = load_model(t_path).eval()
    task = ChatBasicsTask(tokenizer, n_eval_per_family=args.per_family)
    examples = task.eval_examples()
    sampling = Sampling(max_new_tokens=args.max_new_tokens, greedy=True)

    def decode(model: torch.nn.Module) -> list[Rollouts]:
        return [generate_rollouts(model, tokenizer, examples[i:i + args.batch_size], sampling)
                for i in range(0, len(examples), args.batch_size)]

    teacher_texts = [t for r in decode(teacher) for t in decode_completions(tokenizer, r)]
    results = []
    print(f"{'model':<48} {'accuracy':>8} {'agree':>6} {'RKL(S|T)':>9} {'cut':>6} {'s':>5}")
    for name in [args.teacher] + args.models:
        start = time.perf_counter()
        model = teacher if name == args.teacher else load_model(resolve_model_path(name)).eval()
        batches = decode(model)
        scores = torch.cat([verify_rollouts(task, tokenizer, r) for r in batches])
        texts = [t for r in batches for t in decode_completions(tokenizer, r)]
        cut = torch.cat([r.truncated_B.float() for r in batches])
        rkl_sum = tokens = 0.0
        for r in batches:
            s, n = exact_rkl(model, teacher, r)
            rkl_sum, tokens = rkl_sum + s, tokens + n
        row = {"model": name, "accuracy": float(scores.mean()),
               "agreement": sum(a == b for a, b in zip(texts, teacher_texts, strict=True)) / len(texts),
               "rkl": rkl_sum / max(tokens, 1), "cut": float(cut.mean()), "n": len(texts),
               "per_family": {f: float(scores[[e.fields["family"] == f for e in examples]].mean())
                              for f in task.families},
               "max_new_tokens": args.max_new_tokens}
        results.append(row)
        print(f"{name:<48} {row['accuracy']:8.3f} {row['agreement']:6.3f} {row['rkl']:9.4f} {row['cut']:6.3f} "
              f"{time.perf_counter() - start:5.0f}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
