"""``opd export SOURCE OUT``: write a student as full Hugging Face weights (LoRA adapters merged).

SOURCE is a run folder (its ``final/`` when the run finished, else its newest checkpoint;
``--step N`` picks a checkpoint), a checkpoint folder (``checkpoints/step-000050`` or its
``model/``), or any model / adapter folder. A LoRA adapter is loaded onto its base model and merged
(``W + (α/r)·B A``, opd/lora.py); the base is ``--base`` if given, else the run's ``student.model``
(from its ``config.yaml``), else the adapter's own ``base_model_name_or_path``. OUT then holds
``config.json``, ``model.safetensors`` and the tokenizer: ``AutoModelForCausalLM.from_pretrained(OUT)``
loads it without peft. ``--check`` loads OUT back that way and prints the largest logit difference
to the unmerged model on a few prompts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "export"
HELP = "write a run's student (LoRA merged) as a plain Hugging Face model folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a run folder, a checkpoint folder, or a model / adapter folder")
    parser.add_argument("out", help="the folder to write (created; files of the same name are replaced)")
    parser.add_argument("--step", type=int, help="export the run's checkpoint of this step instead of final/")
    parser.add_argument("--base", help="base model of a LoRA adapter (default: the run's student.model)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                        help="dtype to load and write the weights in (default: the run's student.dtype, else "
                             "float32; auto: as stored). A LoRA adapter needs the dtype it was trained in")
    parser.add_argument("--check", action="store_true",
                        help="reload OUT with AutoModelForCausalLM and compare its logits with the unmerged model")


def _run_dir_of(folder: Path) -> Path | None:
    """The run folder that holds ``folder`` (run/, run/final, run/checkpoints/step-N[/model]), if any."""
    for candidate in (folder, *list(folder.parents)[:3]):
        has_weights = (candidate / "checkpoints").is_dir() or (candidate / "final").is_dir()
        if (candidate / "config.yaml").is_file() and has_weights:
            return candidate
    return None


def resolve_source(source: str | Path, step: int | None = None) -> tuple[Path, Path | None]:
    """``(weights folder, run folder or None)`` for what the user named (see the module docstring).

    Raises:
        FileNotFoundError: the folder, the run's final/ and checkpoints, or the asked step are missing.
    """
    src = Path(source).expanduser()
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder; pass a run folder, a checkpoint folder or a model folder")
    run = _run_dir_of(src)
    if run is not None and src == run:
        ckpts = sorted((run / "checkpoints").glob("step-*")) if (run / "checkpoints").is_dir() else []
        if step is not None:
            chosen = run / "checkpoints" / f"step-{step:06d}"
            if not chosen.is_dir():
                have = ", ".join(p.name for p in ckpts) or "none"
                raise FileNotFoundError(f"{run} has no checkpoint for step {step} (checkpoints: {have})")
            src = chosen
        elif (run / "final").is_dir():
            src = run / "final"
        elif ckpts:
            src = ckpts[-1]
        else:
            raise FileNotFoundError(f"{run} has neither final/ nor checkpoints; nothing to export")
    if (src / "model").is_dir():  # a step checkpoint: model/ + trainer_state.pt
        src = src / "model"
    return src, run


def run(args: argparse.Namespace) -> int:
    from opd.config.load import load_config  # light: validates the run's config

    weights, run_dir = resolve_source(args.source, args.step)
    base, dtype = args.base, args.dtype
    if run_dir is not None:
        student = load_config(str(run_dir / "config.yaml")).student
        base, dtype = base or student.model, dtype or student.dtype
    dtype = dtype or "float32"

    import torch

    from opd.lora import is_adapter_folder, load_adapter_model, merged_copy
    from opd.model_paths import resolve_model_path
    from opd.models import count_parameters, load_model, load_tokenizer

    out = Path(args.out).expanduser()
    if out.resolve() == weights.resolve():
        raise ValueError(f"OUT ({out}) is the source folder; write the export somewhere else")
    if is_adapter_folder(weights):
        lora_model = load_adapter_model(weights, base=resolve_model_path(base) if base else None, dtype=dtype)
        model = merged_copy(lora_model)
        what = "LoRA adapter merged into its base"
    else:
        lora_model = None
        model = load_model(weights, dtype=dtype)
        what = "full weights"
    tok_source = weights if any((weights / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")) else (
        Path(resolve_model_path(base)) if base else None)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tok_source is not None:
        load_tokenizer(tok_source).save_pretrained(out)
    print(f"opd export: {what} ({count_parameters(model):,} parameters) from {weights} -> {out}")
    if args.check:
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=model.dtype).eval()
        reference = (lora_model if lora_model is not None else model).eval()
        vocab = reloaded.get_input_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (reloaded(input_ids=ids).logits.float() - reference(input_ids=ids).logits.float()).abs().max()
        print(f"opd export: check: AutoModelForCausalLM.from_pretrained({str(out)!r}) loads; max |Δ logit| vs the "
              f"unmerged model on 4×16 random tokens = {float(diff):.2e}")
    return 0
