"""Help texts: ``opd methods`` (the presets) and ``opd config-help`` (every option)."""

from __future__ import annotations

import textwrap
import typing
from typing import Any

from opd.config.fields import ConfigError, field_specs, range_text, suggest
from opd.config.presets import PRESETS
from opd.config.schema import SECTIONS, Config

__all__ = ["format_config_help", "format_methods"]


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and (not value or value != value.strip() or "\n" in value):
        return repr(value)
    return str(value)


def _wrap(text: str, indent: str) -> str:
    # never split a URL, an arXiv id or an option name at a hyphen
    return textwrap.fill(text, width=100, initial_indent=indent, subsequent_indent=indent,
                         break_on_hyphens=False, break_long_words=False)


def format_methods() -> str:
    """The ``opd methods`` listing: per preset its summary, formula, source, notes and the variables it sets."""
    lines = [f"Method presets ({len(PRESETS)}): `method: NAME` in a config (or `method=NAME` on the command line)",
             "applies the values below; the file's own values and the overrides still win. Sections follow the",
             "pipeline; formulas use the notation of docs/methods.md §1 (r_t = log π_T(y_t) − log π_S(y_t),",
             "ρ_t = π_S(y_t)/μ(y_t), mean_t = the configured token reduction). Tags: [INFER] = our",
             "reconstruction where the source does not pin a detail; [MEMORY] = recalled from the paper, not",
             "re-verified (docs/methods.md §0).", ""]
    for preset in PRESETS.values():
        lines.append(preset.name)
        lines.append(_wrap(preset.summary, "    "))
        lines.append(_wrap("formula: " + preset.formula, "    "))
        lines.append(_wrap("source: " + preset.citation, "    "))
        if preset.notes:
            lines.append(_wrap("notes: " + preset.notes, "    "))
        by_section: dict[str, list[str]] = {}
        for path, value in preset.settings():
            section, key = path.split(".", 1)
            by_section.setdefault(section, []).append(f"{key}={_show(value)}")
        width = max(len(s) for s in by_section) + 1
        for section, items in by_section.items():
            lines.append(textwrap.fill(" ".join(items), width=100, initial_indent=f"  {section + ':':<{width}} ",
                                       subsequent_indent=" " * (width + 3)))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def format_config_help(section: str | None = None) -> str:
    """The ``opd config-help`` text: every option (or one section's) with type, default, choices or
    range, and documentation."""
    hints = typing.get_type_hints(Config)
    if section is not None and section not in SECTIONS:
        hint = suggest(section, SECTIONS)
        raise ConfigError([f"config-help: unknown section {section!r}"
                           + (f"; did you mean {hint}?" if hint else "")
                           + f" The sections are: {', '.join(SECTIONS)}"], header="unknown section")
    lines = []
    if section is None:
        lines += ["opd configuration: one section per design variable, in pipeline order. Set options in a YAML",
                  "file (`route2: {credit: gae}`) or on the command line (`route2.credit=gae`); `method: NAME`",
                  "applies a preset first (`opd methods`).", ""]
    current = None
    for spec in field_specs().values():
        if section is not None and spec.section != section:
            continue
        if spec.section != current:
            current = spec.section
            if current is not None:
                doc = (hints[current].__doc__ or "").strip().splitlines()[0]
                lines += ["", f"{current}:", _wrap(doc, "  ")]
        extra = (f"   one of: {', '.join(spec.choices)}" if spec.choices
                 else f"   range: {range_text(spec)}" if range_text(spec) else "")
        indent = "  " if spec.section is not None else ""
        lines.append(f"{indent}{spec.name}: {spec.type_name} = {_show(spec.default)}{extra}")
        lines.append(_wrap(spec.doc, indent + "    "))
    return "\n".join(lines).strip("\n") + "\n"
