"""The :class:`Preset` record and the value blocks the presets share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opd.config.fields import field_specs


@dataclass(frozen=True)
class Preset:
    """A named method: ``values`` maps section → {option: value}.

    ``summary`` says what the method does, ``citation`` where it comes from (arXiv id / URL),
    ``formula`` the per-token objective it sets (shown by ``opd methods``; symbols as in
    docs/methods.md §1), ``notes`` deviations from the source and the provenance of constants:
    **[INFER]** (our reconstruction: the source does not pin it) or **[MEMORY]** (recalled from the
    paper, not re-verified) — docs/methods.md §0.
    """

    name: str
    summary: str
    citation: str
    formula: str
    values: dict[str, dict[str, Any]]
    notes: str = ""

    def settings(self) -> list[tuple[str, Any]]:
        """The preset's (dotted option, value) pairs in schema order."""
        return [(spec.path, self.values[spec.section][spec.name]) for spec in field_specs().values()
                if spec.section in self.values and spec.name in self.values[spec.section]]


ROUTE1_OFF: dict[str, Any] = {"divergence": "none"}
ROUTE2_OFF: dict[str, Any] = {"coef": 0.0}
ON_POLICY: dict[str, Any] = {"on_policy_fraction": 1.0, "teacher_mix": 0.0}


def route1_values(route1: dict[str, Any], *, rollout: dict[str, Any] | None = None,
                  teacher: dict[str, Any] | None = None, support: dict[str, Any] | None = None,
                  **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The values of a route-1 method: on-policy rollouts (:data:`ON_POLICY` updated with ``rollout``),
    the teacher's full logits (``teacher`` updates ``{"access": "full"}``) on the full vocabulary
    (``support``; ``{}`` leaves the support unset), the ``route1`` block, route 2 off; ``sections`` add
    or replace whole sections."""
    values = {"rollout": {**ON_POLICY, **(rollout or {})}, "teacher": {"access": "full", **(teacher or {})},
              "support": {"kind": "full"} if support is None else support, "route1": route1,
              "route2": dict(ROUTE2_OFF), **sections}
    return {k: v for k, v in values.items() if v}


def route2_values(route2: dict[str, Any] | None = None, *, rollout: dict[str, Any] | None = None,
                  teacher: dict[str, Any] | None = None, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The values of a sampled-token route-2 method: on-policy rollouts (:data:`ON_POLICY` updated with
    ``rollout``), the teacher's sampled-token log-probs (``teacher`` updates ``{"access": "sampled"}``),
    route 1 off, the ``route2`` block (default :func:`sampled_token` ``()``), softmax routing;
    ``sections`` (e.g. a ``support`` for a value on the teacher's distribution) add or replace whole
    sections."""
    return {"rollout": {**ON_POLICY, **(rollout or {})}, "teacher": {"access": "sampled", **(teacher or {})},
            "route1": dict(ROUTE1_OFF), "route2": sampled_token() if route2 is None else route2,
            "routing": {"kind": "softmax"}, **sections}


#: The self-teacher of the self-distillation presets: the student shown the example's privileged context.
SELF_TEACHER: dict[str, Any] = {"model": "self", "self_mode": "frozen", "use_context": True}


def sampled_token(**overrides: Any) -> dict[str, Any]:
    """The route-2 block of plain sampled-token OPD (r_t = log π_T − log π_S, immediate credit, no
    baseline, importance ratio π_S/μ), with ``overrides``."""
    block: dict[str, Any] = {"coef": 1.0, "reward": "log_ratio", "credit": "immediate", "baseline": "none",
                             "future_only": False, "is_correction": "ratio"}
    block.update(overrides)
    return block
