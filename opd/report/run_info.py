"""``<run>/run_info.json``: what the config cannot say — parameter counts, vocabulary, device, versions.

Written once when a run starts (:func:`opd.train.distill`); the report's compute item reads the
teacher's parameter count ``N_T`` from it to estimate teacher forward FLOPs as ``2·N_T`` per scored
token (the usual dense-transformer forward estimate, Kaplan et al. 2020, arXiv 2001.08361).
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from opd.config.load import config_to_dict
from opd.config.schema import Config

__all__ = ["param_count", "read_json", "run_info", "write_json"]


def param_count(module: Any) -> int | None:
    """Number of parameters of a ``torch.nn.Module`` (None for anything else)."""
    if not isinstance(module, torch.nn.Module):
        return None
    return int(sum(p.numel() for p in module.parameters()))


def _teacher_info(teacher: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"kind": type(teacher).__name__}
    routes = getattr(teacher, "routes", None)
    if isinstance(routes, dict):
        counts = {str(k): param_count(getattr(v, "model", None)) for k, v in routes.items()}
        default = getattr(teacher, "default", None)
        if default is not None:
            counts["(default)"] = param_count(getattr(default, "model", None))
        info["route_parameters"] = counts
        known = [c for c in counts.values() if c is not None]
        info["parameters"] = max(known) if known else None  # an upper bound per scored token
    else:
        info["parameters"] = param_count(getattr(teacher, "model", None))
    return info


def run_info(cfg: Config, *, student: torch.nn.Module, teacher: Any, reference: Any, vocab: int,
             device: torch.device | str, world: int, access: str) -> dict[str, Any]:
    """The facts about a run that its config does not hold (JSON-ready)."""
    import transformers

    import opd

    ref_model = getattr(reference, "model", None) if reference is not None else None
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"opd": getattr(opd, "__version__", "unknown"), "python": sys.version.split()[0],
                     "torch": torch.__version__, "transformers": transformers.__version__},
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(0) if str(device).startswith("cuda") else platform.processor()
        or platform.machine(),
        "world_size": world,
        "torch_threads": torch.get_num_threads(),
        "student": {"model": cfg.student.model, "parameters": param_count(student), "vocab_size": vocab,
                    "dtype": cfg.student.dtype},
        "teacher": {"model": cfg.teacher.model, "access": access, "dtype": cfg.teacher.dtype, **_teacher_info(teacher)},
        "reference": None if ref_model is None else {"model": cfg.regularization.reference,
                                                     "parameters": param_count(ref_model)},
        "student_card": _card(cfg.student.model),
        "seed": cfg.seed,
        "config": config_to_dict(cfg),
    }


def _card(model: str) -> dict[str, Any] | None:
    """How the student was made, from the ``opd_card.json`` shipped beside opd's own checkpoints."""
    from opd.model_paths import resolve_model_path

    try:
        card = read_json(Path(resolve_model_path(model)) / "opd_card.json")
    except (OSError, ValueError):
        return None
    if not isinstance(card, dict):
        return None
    phase = card.get("phase") or {}
    return {"name": card.get("name"), "sft_teacher": phase.get("teacher"),
            "heldout_accuracy": card.get("heldout_accuracy"), "steps": card.get("steps")}


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON (non-finite floats become strings, as in metrics.jsonl)."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(data), indent=2) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when the file does not exist."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
