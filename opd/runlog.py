"""The run folder and its logs: resolved config, ``metrics.jsonl``, TensorBoard / W&B, summary.

``metrics.jsonl`` holds one JSON object per line, each with ``kind`` (``train`` or ``eval``)
and ``step``; on resume the lines after the resumed step are dropped so the file reads as one
uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf; keep them visible
    return value


class RunLog:
    """Append-only metrics log of a run (rank 0 writes; other ranks hold a no-op log)."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = False,
                 wandb: bool = False, wandb_config: dict[str, Any] | None = None):
        self.run_dir = run_dir
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # pragma: no cover - depends on the environment
                raise ImportError("logging.tensorboard=true needs `pip install tensorboard`") from err
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError as err:  # pragma: no cover
                raise ImportError("logging.wandb=true needs `pip install wandb`") from err
            self._wandb = wandb_lib.init(project="opd", dir=str(run_dir), config=wandb_config or {})

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (resume)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3)}
        record.update({k: _clean(v) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k if kind == "train" else f"{kind}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({(k if kind == "train" else f"{kind}/{k}"): v for k, v in numeric.items()}, step=step)

    def close(self) -> None:
        """Flush and close the TensorBoard / W&B writers (safe to call more than once)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl`` (optionally of one kind)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} an opd run folder?")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]
