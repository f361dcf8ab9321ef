"""Method presets: a published method is a named point in the space of design variables.

``method: NAME`` in a config file (or the override ``method=NAME``) applies the preset's values
on top of the schema defaults and *under* the file's own values and the overrides, so any
variable of a method can still be changed. Each preset sets, explicitly, every variable that
defines the method — including ``route1.divergence: none`` or ``route2.coef: 0`` for the route it
does not use — cites its source (arXiv id / URL), states its formula, and labels the constants the
source does not pin **[INFER]** (our reconstruction) or **[MEMORY]** (recalled, not re-verified);
docs/methods.md §0 explains the tags and §4 lists every preset.

The presets live in one module per family (:mod:`.foundations`: teacher-student and self-distillation;
:mod:`.estimators`: route-2 estimators and stabilisation recipes; :mod:`.recent`: what other frameworks run
and methods published since mid-2026), each a ``PRESETS`` tuple that :func:`collect_presets` gathers; the
values blocks are built by the helpers of :mod:`.base` (:func:`~.base.route1_values`,
:func:`~.base.route2_values`). ``opd methods`` and ``opd config-help`` print them (:mod:`opd.config.docs`).
Adding a preset: CONTRIBUTING.md.
"""

from __future__ import annotations

from types import ModuleType

from opd.config.fields import suggest
from opd.config.presets import estimators, foundations, recent
from opd.config.presets.base import Preset

__all__ = ["FAMILIES", "PRESETS", "Preset", "collect_presets", "unknown_method_message"]

#: The family modules, in the order ``opd methods`` lists their presets (after :data:`INTRODUCED`).
FAMILIES = (foundations, estimators, recent)
#: The first presets, listed first and in the order they were introduced.
INTRODUCED = ("thinking-machines", "gkd", "minillm", "vopd", "gae-opd", "cr-opd", "opsd", "sft-teacher", "fu-topk",
              "distillm", "power-opd", "exopd")


def collect_presets(families: tuple[ModuleType, ...] = FAMILIES) -> dict[str, Preset]:
    """Every family module's ``PRESETS`` by name: :data:`INTRODUCED` first, then the others in family
    order (a preset added to a family's tuple is listed without another edit). A ``ValueError`` for a
    name used twice or an :data:`INTRODUCED` name no family defines."""
    by_name: dict[str, Preset] = {}
    for module in families:
        for preset in module.PRESETS:
            if preset.name in by_name:
                raise ValueError(f"preset {preset.name!r} is defined twice ({module.__name__})")
            by_name[preset.name] = preset
    missing = [name for name in INTRODUCED if name not in by_name]
    if missing:
        raise ValueError(f"INTRODUCED names presets no family defines: {', '.join(missing)}")
    order = [*INTRODUCED, *(name for name in by_name if name not in INTRODUCED)]
    return {name: by_name[name] for name in order}


PRESETS: dict[str, Preset] = collect_presets()


def unknown_method_message(name: str) -> str:
    """The error for an unknown ``method`` name: a suggestion and the list of presets."""
    hint = suggest(str(name), list(PRESETS))
    return (f"method={name!r} is not a preset" + (f"; did you mean {hint}?" if hint else "")
            + f" The presets are: {', '.join(PRESETS)} (see `opd methods`)")
