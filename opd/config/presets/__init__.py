"""Method presets: a published method is a named point in the space of design variables.

``method: NAME`` in a config file (or the override ``method=NAME``) applies the preset's values
on top of the schema defaults and *under* the file's own values and the overrides, so any
variable of a method can still be changed. Each preset sets, explicitly, every variable that
defines the method — including ``route1.divergence: none`` or ``route2.coef: 0`` for the route it
does not use — cites its source (arXiv id / URL), states its formula, and labels the constants the
source does not pin **[INFER]** (our reconstruction) or **[MEMORY]** (recalled, not re-verified);
docs/methods.md §0 explains the tags and §4 lists every preset.

The presets live in one module per family (:mod:`.foundations`, :mod:`.estimators`,
:mod:`.stability`, :mod:`.self_distillation`, :mod:`.frameworks`, :mod:`.recent`); ``opd methods`` and
``opd config-help`` print them (:mod:`opd.config.docs`).
"""

from __future__ import annotations

from opd.config.fields import suggest
from opd.config.presets import estimators, foundations, frameworks, recent, self_distillation, stability
from opd.config.presets.base import Preset

__all__ = ["PRESETS", "Preset", "unknown_method_message"]

_BY_NAME = {p.name: p for module in (foundations, estimators, stability, self_distillation, frameworks, recent)
            for p in module.PRESETS}
# the order of `opd methods`: the first twelve presets as they were introduced, then the rest by family
_ORDER = (
    "thinking-machines", "gkd", "minillm", "vopd", "gae-opd", "cr-opd", "opsd", "sft-teacher", "fu-topk",
    "distillm", "power-opd", "exopd",
    "distillm-2", "akl", "tvd",
    "iw-opd", "opdvr", "opsa",
    "eopd", "stable-opd", "tip", "lightning-opd",
    "sdft", "sdpo",
    "verl-fkl-topk", "verl-k3", "nemo-rl-opd", "prime-rl-hybrid", "slime-opd",
    "opd-plus", "tropd", "tropd-clip", "mopd", "async-opd", "bridging", "topd", "rlcsd",
)
if set(_ORDER) != set(_BY_NAME) or len(_ORDER) != len(_BY_NAME):
    raise RuntimeError(f"preset order and preset modules disagree: {sorted(set(_ORDER) ^ set(_BY_NAME))}")

PRESETS: dict[str, Preset] = {name: _BY_NAME[name] for name in _ORDER}


def unknown_method_message(name: str) -> str:
    """The error for an unknown ``method`` name: a suggestion and the list of presets."""
    hint = suggest(str(name), list(PRESETS))
    return (f"method={name!r} is not a preset" + (f"; did you mean {hint}?" if hint else "")
            + f" The presets are: {', '.join(PRESETS)} (see `opd methods`)")
