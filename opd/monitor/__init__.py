"""A run that explains itself: live diagnostics, failure detectors and stabilization recipes.

* :mod:`opd.monitor.live` — per-step ``diag/*`` metrics from the objective's token statistics and
  the rollouts (docs/methods.md §3.7), the NaN/Inf check, sample completions with per-token log-ratios;
* :mod:`opd.monitor.detectors` — the failure detectors (docs/methods.md §3.8) and :class:`Monitor`,
  which reports each once per run to ``<run>/events.jsonl`` and acts (warn / stop / apply);
* :mod:`opd.monitor.recipes` — the stabilization recipe of each detector (docs/methods.md §3.9).

docs/diagnostics.md documents every metric, rule, threshold and recipe.
"""

from opd.monitor.detectors import DETECTORS, Detector, Event, History, Monitor
from opd.monitor.live import batch_samples, nonfinite_evidence, sequence_metrics, token_metrics
from opd.monitor.recipes import RECIPES, Recipe, apply_recipe, recipe_for

__all__ = [
    "DETECTORS", "RECIPES", "Detector", "Event", "History", "Monitor", "Recipe", "apply_recipe",
    "batch_samples", "nonfinite_evidence", "recipe_for", "sequence_metrics", "token_metrics",
]
