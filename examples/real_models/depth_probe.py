"""How deep must a pruned student stay for a real but recoverable gap? (docs/real_models.md §5)

    python examples/real_models/depth_probe.py angular:28 angular:27 angular:26 angular:24 uniform:26

Loads the teacher once, scores its blocks as ``opd make-student`` does (angular distance between a
block's input and output at the last prompt token, mean over 64 chat_basics training questions), and
for each ``METHOD:KEEP`` builds that prune in memory (``opd.prune``: the same choice as ``opd make-student
--method METHOD --keep KEEP``) and scores it untouched on the held-out chat_basics questions (greedy,
``--max-new-tokens``), printing accuracy, the share cut at the limit, per-family accuracy and a few
completions. Nothing is written.
"""

from __future__ import annotations

import argparse
import time

import torch

from opd.commands.make_student import DEFAULT_PROMPTS, prompt_texts
from opd.evaluate import evaluate
from opd.model_paths import resolve_model_path
from opd.models import load_model, load_tokenizer
from opd.prune import choose_layers, decoder_layers, measure_block_distances, prune_layers
from opd.rollout import encode_prompts
from opd.tasks.chat_basics import ChatBasicsTask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prunes", nargs="+", metavar="METHOD:KEEP", help="e.g. angular:26 or uniform:26")
    p.add_argument("--teacher", default="builtin:smollm2-135m-instruct")
    p.add_argument("--per-family", type=int, default=14)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--samples", type=int, default=2, help="completions printed per family")
    a = p.parse_args()
    path = resolve_model_path(a.teacher)
    tok, teacher = load_tokenizer(path), load_model(path).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    texts = prompt_texts(tok, None, prompt_field="prompt", limit=64)
    batches = [encode_prompts(tok, texts[i:i + 16]) for i in range(0, len(texts), 16)]
    scores = measure_block_distances(teacher, batches, span=1).tolist()
    n_layers = len(decoder_layers(teacher)[2])
    print(f"block scores ({DEFAULT_PROMPTS}): " + " ".join(f"{i}:{s:.3f}" for i, s in enumerate(scores)))
    task = ChatBasicsTask(tok, n_eval_per_family=a.per_family)
    examples = task.eval_examples()
    for spec in a.prunes:
        method, keep = spec.split(":")
        if method == "contiguous":
            raise SystemExit("contiguous prunes: use opd make-student --method contiguous (span scores)")
        kept = choose_layers(n_layers, int(keep), method, layer_scores=scores)
        student = prune_layers(teacher, kept)
        start = time.perf_counter()
        r = evaluate(student, tok, task, examples, max_new_tokens=a.max_new_tokens, batch_size=64,
                     samples=len(examples))
        families: dict[str, list[float]] = {}
        for example, sample in zip(examples, r.samples, strict=True):
            families.setdefault(example.fields["family"], []).append(sample["score"])
        per = " ".join(f"{f} {sum(v) / len(v):.2f}" for f, v in families.items())
        print(f"{spec}: kept {kept}; accuracy {r.accuracy:.3f}, cut {r.truncation_rate:.3f} ({per}); "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        shown: dict[str, int] = {}
        for example, sample in zip(examples, r.samples, strict=True):
            family = example.fields["family"]
            if shown.get(family, 0) < a.samples:
                shown[family] = shown.get(family, 0) + 1
                print(f"    {'✓' if sample['score'] >= 1 else '✗'} {sample['completion'][:80]!r}")
        del student
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
