"""``opd make-student TEACHER OUT``: a smaller student made from the teacher by depth pruning.

The student keeps ``--keep N`` of the teacher's ``L`` decoder blocks (embeddings, final norm and
head are the teacher's), chosen by ``--method``:

  angular     the N blocks with the largest angular distance between their input and output
              hidden states, measured on the prompts (Gromov et al., arXiv 2403.17887)
  contiguous  Gromov et al.'s rule: drop the run of L − N consecutive blocks whose input and output
              are closest
  uniform     N blocks evenly spaced over the depth, first and last included (the baseline)

or by ``--layers 0,1,5,...`` (explicit block indices). Scores are measured on the rows of
``--prompts FILE.jsonl`` (a ``prompt`` field, or chat ``messages`` rendered with the teacher's chat
template), by default on the built-in chat_basics questions; the angular distance of every block is
measured and recorded whatever the method.

OUT gets the student (``save_pretrained``), the teacher's tokenizer and chat template, and
``opd_card.json``: the teacher, the method, the kept blocks and every block's score.

Examples:
  opd make-student builtin:smollm2-135m-instruct runs/student-10 --keep 10
  opd make-student teacher/ student/ --keep 12 --method contiguous --prompts my_prompts.jsonl
  opd make-student model.gguf student/ --layers 0,1,2,5,9,29
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

NAME = "make-student"
HELP = "make a smaller student from the teacher by depth pruning (keep N of its L layers)"
DEFAULT_PROMPTS = "the built-in chat_basics questions"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("teacher", metavar="TEACHER",
                   help="teacher model: a folder, a .gguf file, a hub id or builtin:smollm2-135m-instruct")
    p.add_argument("out", metavar="OUT", help="folder to write the student to (must not exist, or be empty)")
    p.add_argument("--keep", type=int, default=None, metavar="N", help="number of decoder blocks the student keeps")
    p.add_argument("--method", choices=("angular", "contiguous", "uniform"), default="angular",
                   help="how the kept blocks are chosen (see above)")
    p.add_argument("--layers", default=None, metavar="I,J,...",
                   help="keep exactly these block indices (0-based; overrides --keep and --method)")
    p.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                   help=f"prompts the scores are measured on (default: {DEFAULT_PROMPTS})")
    p.add_argument("--prompt-field", default="prompt", help="JSONL field of a plain-text prompt")
    p.add_argument("--num-prompts", type=int, default=64, help="measure on the first N prompts")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the teacher while measuring, and of the student written")


def parse_layers(text: str) -> list[int]:
    """``"0,3, 7"`` → ``[0, 3, 7]``.

    Raises:
        ValueError: an entry that is not an integer (the message names it).
    """
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise ValueError(f"--layers {text!r}: {part!r} is not a block index; pass integers separated by commas, "
                             "e.g. --layers 0,1,5,29") from None
    if not out:
        raise ValueError(f"--layers {text!r} lists no block; pass e.g. --layers 0,1,5,29")
    return out


def _check_args(args: argparse.Namespace) -> list[int] | None:
    """Everything that can be checked before a model is loaded; returns the explicit layers."""
    layers = parse_layers(args.layers) if args.layers is not None else None
    if layers is None and args.keep is None:
        raise ValueError("say how many blocks the student keeps: --keep N (e.g. --keep 10), or list them with "
                         "--layers I,J,...")
    if args.keep is not None and args.keep < 1:
        raise ValueError(f"--keep must be at least 1, got {args.keep}")
    if layers is not None and args.keep is not None and args.keep != len(layers):
        raise ValueError(f"--keep {args.keep} but --layers lists {len(layers)} blocks; pass one of them")
    for name in ("num_prompts", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.prompts is not None and not Path(args.prompts).expanduser().is_file():
        raise FileNotFoundError(f"--prompts {args.prompts}: no such file; pass a JSONL file with one JSON object per "
                                "line (a 'prompt' text or chat 'messages')")
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty folder; choose a new OUT folder")
    return layers


def prompt_texts(tokenizer: Any, prompts: str | None, *, prompt_field: str, limit: int) -> list[str]:
    """The prompt texts the scores are measured on: rows of ``prompts`` (``prompt_field`` text, or chat
    ``messages`` rendered with ``tokenizer``'s template without their final assistant turn), else the
    chat_basics training questions.

    Raises:
        ValueError: a row with neither field, chat rows for a tokenizer without a chat template.
    """
    from opd.tasks.base import RenderedPrompt

    if prompts is None:
        from opd.tasks.chat_basics import DEFAULT_FAMILIES, records

        rows: list[dict[str, Any]] = records(-(-limit // len(DEFAULT_FAMILIES)), held_out=False)
        where = DEFAULT_PROMPTS
    else:
        from opd.data import read_jsonl

        rows, where = read_jsonl(prompts), prompts
    texts: list[str] = []
    for i, row in enumerate(rows[:limit]):
        if "messages" in row:
            messages = list(row["messages"])
            while messages and messages[-1].get("role") == "assistant":
                messages.pop()
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError(f"{where}: row {i + 1} is a chat conversation, but the teacher's tokenizer has no "
                                 f"chat template; pass plain {prompt_field!r} rows")
            texts.append(RenderedPrompt(tokenizer.apply_chat_template(messages, tokenize=False,
                                                                      add_generation_prompt=True)))
        elif isinstance(row.get(prompt_field), str):
            texts.append(row[prompt_field])
        else:
            raise ValueError(f"{where}: row {i + 1} has neither 'messages' nor a {prompt_field!r} text (fields "
                             f"{sorted(row)}); pass --prompt-field")
    return texts


def run(args: argparse.Namespace) -> int:
    layers = _check_args(args)

    from opd.model_paths import resolve_model_path
    from opd.models import count_parameters, load_model, load_tokenizer
    from opd.prune import (
        PruneError,
        check_layer_indices,
        choose_layers,
        decoder_layers,
        measure_block_distances,
        prune_layers,
    )
    from opd.rollout import encode_prompts
    from opd.shipped.save import save_shipped_checkpoint

    path = resolve_model_path(args.teacher)
    tokenizer = load_tokenizer(path)
    teacher = load_model(path, dtype=args.dtype)
    n_layers = len(decoder_layers(teacher)[2])
    keep = len(layers) if layers is not None else args.keep
    if not 1 <= keep <= n_layers:
        raise PruneError(f"--keep {keep}: the teacher has {n_layers} decoder blocks; keep between 1 and {n_layers}")
    if layers is not None:
        layers = check_layer_indices(layers, n_layers)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = prompt_texts(tokenizer, args.prompts, prompt_field=args.prompt_field, limit=args.num_prompts)
    batches = [encode_prompts(tokenizer, texts[i:i + args.batch_size]) for i in range(0, len(texts), args.batch_size)]
    per_layer = measure_block_distances(teacher, batches, span=1).tolist()
    card: dict[str, Any] = {
        "made_by": "opd make-student", "teacher": args.teacher, "teacher_layers": n_layers,
        "method": "explicit" if layers is not None else args.method, "keep": keep,
        "score": {"name": "angular distance between a block's input and output hidden states at the last prompt "
                          "token, mean over the prompts (Gromov et al., arXiv 2403.17887)",
                  "prompts": args.prompts or DEFAULT_PROMPTS, "num_prompts": len(texts),
                  "per_layer": {str(i): round(s, 6) for i, s in enumerate(per_layer)}},
    }
    if layers is not None:
        kept = layers
    elif args.method == "contiguous" and keep < n_layers:
        span = measure_block_distances(teacher, batches, span=n_layers - keep).tolist()
        kept = choose_layers(n_layers, keep, "contiguous", span_scores=span)
        card["span_scores"] = {"span": n_layers - keep, "start_to_score": {str(i): round(s, 6) for i, s in
                                                                          enumerate(span)}}
    else:
        kept = choose_layers(n_layers, keep, args.method, layer_scores=per_layer)
    student = prune_layers(teacher, kept)
    card["kept_layers"] = kept
    card["removed_layers"] = [i for i in range(n_layers) if i not in kept]
    card["parameters"] = {"teacher": count_parameters(teacher), "student": count_parameters(student)}
    out = Path(args.out).expanduser()
    save_shipped_checkpoint(student, tokenizer, card, out)
    scores = " ".join(f"{i}:{s:.3f}{'*' if i in kept else ''}" for i, s in enumerate(per_layer))
    print(f"opd make-student: block scores (angular distance, * = kept): {scores}")
    print(f"opd make-student: kept {keep} of {n_layers} blocks ({card['method']}): {kept}; "
          f"{card['parameters']['student'] / 1e6:.1f}M of {card['parameters']['teacher'] / 1e6:.1f}M parameters "
          f"-> {out} (opd_card.json records how)")
    return 0
