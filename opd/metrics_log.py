"""The run folder's logs: ``metrics.jsonl`` and, optionally, TensorBoard / W&B.

``metrics.jsonl`` holds one JSON object per line, each with ``kind`` (``train``, ``eval``, ...)
and ``step``; on resume the lines after the resumed step are dropped so the file reads as one
uninterrupted run. Nothing is written (and no folder created) before the first record, so a run
that fails while it is being set up leaves nothing behind. Readers drop a torn last line (a kill
mid-write) and name file and line of any other damage (:func:`opd.io.read_jsonl_tolerant`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opd.io import atomic_write_text, read_jsonl_tolerant, write_error

__all__ = ["MetricsLog", "read_metrics"]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf; keep them visible
    return value


class MetricsLog:
    """Append-only metrics log of a run (rank 0 writes; other ranks hold a no-op log)."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = False,
                 wandb: bool = False, wandb_config: dict[str, Any] | None = None):
        self.run_dir = run_dir
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._want_tb, self._want_wandb, self._wandb_config = tensorboard, wandb, wandb_config or {}
        self._tb = None
        self._wandb = None
        self._opened = False

    def _open(self) -> None:
        """Create the folder and the optional writers at the first record."""
        self._opened = True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self._want_tb:
            from torch.utils.tensorboard import SummaryWriter  # checked by preflight (opd[logging])

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if self._want_wandb:
            import wandb as wandb_lib  # checked by preflight

            self._wandb = wandb_lib.init(project="opd", dir=str(self.run_dir), config=self._wandb_config)

    def truncate_after(self, step: int, *, warn: Callable[[str], None] | None = None) -> None:
        """Drop records past ``step`` (resume); a torn last line is dropped too."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_jsonl_tolerant(self.path, on_torn_tail=warn) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept), what="the metrics log")

    def write(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if not self._opened:
            self._open()
        record = {"kind": kind, "step": step, "time": round(time.time(), 3)}
        record.update({k: _clean(v) for k, v in metrics.items()})
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise write_error("the metrics log", self.path, err) from err
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
    """All records of a run's ``metrics.jsonl`` (optionally of one kind); a torn last line is dropped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} an opd run folder?")
    return [r for r in read_jsonl_tolerant(path) if kind is None or r.get("kind") == kind]
