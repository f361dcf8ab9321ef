"""Loading a configuration: schema defaults → preset (``method``) → YAML file → dotted overrides.

    cfg = load_config("my.yaml", ["route2.credit=gae", "route2.gamma=0.9", "train.betas=[0.9,0.95]"])

Precedence, lowest first: the schema defaults (:mod:`opd.config.schema`); the preset named by
``method`` (taken from the overrides, else from the file; :mod:`opd.config.presets`); the file's
own values; the overrides, in order. A mapping option (``teacher.routes``) is replaced as a whole
by each layer, or set one entry at a time with ``teacher.routes.math=PATH``.

Values are read with YAML 1.2 scalars: ``1e-3`` is a float and only ``true``/``false`` are
booleans (YAML 1.1 would read ``1e-3`` as a string and ``precision: no`` as ``false``). An override
of a string option keeps its text when YAML would read something else
(``teacher.context_template=Hint: {context}``).

A key written twice in one YAML mapping is refused (PyYAML would keep the last one silently), and
so is an option written as two arguments (``train.steps 3``: the message says ``train.steps=3``).

Every problem — unknown sections or keys (with a suggestion; names other trainers use, such as
``save_every``, point at the opd option in whichever section it is), wrong types, out-of-range values,
incompatible combinations (:mod:`opd.config.validate`) — is collected and raised together as one
:class:`ConfigError`, each line naming where the value came from (preset, file or override).
The schema introspection and type conversion live in :mod:`opd.config.fields`.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml

from opd.config.fields import (
    ConfigError,
    FieldSpec,
    Problem,
    coerce_value,
    describe_value,
    field_specs,
    get_value,
    section_keys,
    suggest,
)
from opd.config.presets import PRESETS
from opd.config.schema import SECTIONS, Config
from opd.config.validate import collect_problems, format_problem
from opd.io import atomic_write_text

__all__ = [
    "ConfigError", "FieldSpec", "Problem", "coerce_value", "config_from_dict", "config_to_dict",
    "dump_config", "field_specs", "get_value", "load_config", "parse_override", "read_yaml", "section_keys",
    "suggest", "with_overrides", "yaml_where",
]


# ---------------------------------------------------------------------------------------------
# YAML 1.2 scalars
_BOOL, _FLOAT, _INT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:int"
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT_RE = re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$")
_FLOAT_RE = re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


class _UniqueKeys(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error (PyYAML would
    keep the last value silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first written at line {first + 1}); keep one of them",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


class _Loader(_UniqueKeys):
    """Safe loader with YAML 1.2 booleans, integers and floats (``1e-3`` is a float; ``no`` a string),
    and unique keys."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _FLOAT, _INT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, _BOOL_RE, list("tTfF"))
_Loader.add_implicit_resolver(_INT, _INT_RE, list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """Quotes every string that a YAML 1.1 *or* 1.2 reader would take for something else."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))  # `betas: [0.9, 0.98]`
_Dumper.add_representer(str, lambda dumper, data: dumper.represent_scalar(
    "tag:yaml.org,2002:str", data, style='"' if "\n" in data else None))  # `"{context}\n"` on one line
_Dumper.add_implicit_resolver(_BOOL, _BOOL_RE, list("tTfF"))
_Dumper.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))


def yaml_where(err: yaml.YAMLError) -> str:
    """' at line L, column C: what' for a YAML syntax error (one line, 1-based positions)."""
    mark, context_mark = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
    what = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    if context and context_mark is not None:
        what += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else f": {what}"


def read_yaml(text: str, *, yaml12: bool = True) -> Any:
    """Parse YAML as opd's files are read: a key written twice in one mapping raises ``yaml.YAMLError``
    (say where with :func:`yaml_where`) instead of keeping the last value. ``yaml12``: YAML 1.2 scalars
    (config files); False keeps PyYAML's YAML 1.1 scalars (sweep specs, whose run names come from the
    values as written: ``3e-4`` stays ``3e-4``)."""
    return yaml.load(text, Loader=_Loader if yaml12 else _UniqueKeys)  # noqa: S506 — SafeLoader subclasses



# ---------------------------------------------------------------------------------------------
# layers: (path parts, value, source) entries checked against the schema
@dataclass(frozen=True)
class _Entry:
    parts: tuple[str, ...]
    value: Any
    source: str
    raw: str | None = None  # an override's text, kept for string options


def _is_str_option(spec: FieldSpec) -> bool:
    return spec.type is str or (get_origin(spec.type) in (Union, types.UnionType)
                                and str in get_args(spec.type))


#: names other trainers (HF Trainer, TRL, torchtune, ...) give to an opd option, in any section:
#: ``logging.save_every`` is answered with ``train.checkpoint_every``, not with a near spelling
#: (``save_every`` is closest to ``train.log_every``, which does something else)
_ALIASES: dict[str, str] = {
    **dict.fromkeys(("save_every", "save_steps", "save_interval", "save_freq", "ckpt_every", "checkpoint_interval",
                     "checkpoint_steps", "checkpoint_freq"), "train.checkpoint_every"),
    **dict.fromkeys(("eval_every", "eval_steps", "eval_interval", "eval_freq"), "eval.every"),
    **dict.fromkeys(("logging_steps", "log_interval", "log_freq"), "train.log_every"),
    **dict.fromkeys(("max_steps", "num_steps", "total_steps", "training_steps"), "train.steps"),
    **dict.fromkeys(("learning_rate",), "train.lr"),
    **dict.fromkeys(("output_dir", "out_dir", "save_dir", "log_dir", "checkpoint_dir"), "logging.run_dir"),
    **dict.fromkeys(("num_generations", "num_samples", "n_samples", "group_size"), "rollout.samples_per_prompt"),
    **dict.fromkeys(("max_tokens", "max_completion_length", "max_length"), "rollout.max_new_tokens"),
    **dict.fromkeys(("batch_size", "train_batch_size", "prompts_per_batch"), "rollout.prompts_per_step"),
    **dict.fromkeys(("resume", "resume_from_checkpoint"), "`opd distill --resume RUN_DIR`"),
}


def _alias(key: str, specs: Mapping[str, FieldSpec]) -> str | None:
    """The opd option another trainer's name ``key`` means, with what it does, or None."""
    target = _ALIASES.get(key)
    if target is None:
        return None
    spec = specs.get(target)
    return target if spec is None else f"{target} ({spec.doc.split(';')[0].split('(')[0].strip()})"


def _unknown(parts: tuple[str, ...]) -> str:
    specs, name = field_specs(), ".".join(parts)
    top = [s.path for s in specs.values() if s.section is None]
    head = parts[0]
    if head in top:
        return f"{name}: {head} is a top-level option and has no keys; write {head}=VALUE"
    if head not in SECTIONS:
        owners = [p for p in specs if p.endswith("." + head)]
        hint = _alias(head, specs) or (owners[0] if len(owners) == 1 else suggest(head, [*SECTIONS, *top]))
        return (f"{name}: unknown {'option' if len(parts) == 1 else 'section'}"
                + (f"; did you mean {hint}?" if hint else f"; the sections are: {', '.join(SECTIONS)}"))
    key = parts[1]
    close = suggest(key, section_keys(head))
    elsewhere = [p for p in specs if p.endswith("." + key)]
    hint = _alias(key, specs) or (f"{head}.{close}" if close else (elsewhere[0] if elsewhere else None))
    return (f"{name}: unknown key" + (f"; did you mean {hint}?" if hint else
                                      f"; the keys of {head} are: {', '.join(section_keys(head))}"))


def _locate(entry: _Entry) -> tuple[list[tuple[str, str | None, Any]], list[Problem]]:
    """Resolve an entry to (option path, mapping sub-key or None, value) triples, or problems."""
    parts, specs, src = entry.parts, field_specs(), entry.source
    name = ".".join(parts)
    if len(parts) == 1 and parts[0] in SECTIONS:
        if entry.value is None:
            return [], []
        if not isinstance(entry.value, Mapping):
            return [], [Problem(f"{name}: a section must be a mapping of options, got "
                                f"{describe_value(entry.value)}", (name,), src)]
        out: list[tuple[str, str | None, Any]] = []
        problems: list[Problem] = []
        for key, value in entry.value.items():
            o, p = _locate(_Entry((name, str(key)), value, entry.source))
            out += o
            problems += p
        return out, problems
    path = ".".join(parts[:2]) if len(parts) > 1 else parts[0]
    if path not in specs or (len(parts) == 1) != (specs[path].section is None):
        return [], [Problem(_unknown(parts), (name,), src)]
    spec = specs[path]
    if len(parts) > 2:
        if get_origin(spec.type) is not dict or len(parts) > 3:
            return [], [Problem(f"{name}: {path} is not a mapping option, so it has no sub-key "
                                f"{'.'.join(parts[2:])!r}", (name,), src)]
        return [(path, parts[2], entry.value)], []
    value = entry.value
    if entry.raw is not None and _is_str_option(spec) and not isinstance(value, str) and value is not None:
        value = entry.raw.strip()  # `teacher.context_template=Hint: {context}` stays text
    return [(path, None, value)], []


def _merge(entries: Sequence[_Entry], base: Mapping[str, Any] | None = None
           ) -> tuple[dict[str, Any], dict[str, str], list[Problem]]:
    """Apply entries in order: (values by option path, source of each value, problems)."""
    values: dict[str, Any] = dict(base or {})
    sources: dict[str, str] = {}
    problems: list[Problem] = []
    for entry in entries:
        located, p = _locate(entry)
        problems += p
        for path, sub, value in located:
            if sub is None:
                values[path] = copy.deepcopy(value)
            else:
                current = values.get(path, field_specs()[path].default)
                merged = dict(current) if isinstance(current, Mapping) else {}
                merged[sub] = copy.deepcopy(value)
                values[path] = merged
            sources[path] = entry.source
    return values, sources, problems


def _mapping_entries(data: Mapping[str, Any], source: str) -> list[_Entry]:
    return [_Entry((str(key),), value, source) for key, value in data.items()]


def _looks_like_option(text: str) -> bool:
    """``train.steps`` (or any ``section.key``, ``seed``): an option's name, not a file or a value."""
    head = text.split(".", 1)[0]
    return text in field_specs() or ("." in text and head in SECTIONS)


def _bare_value(text: str | None) -> bool:
    """An argument that can only be the value of the option before it (``3`` in ``train.steps 3``)."""
    return text is not None and "=" not in text and not _looks_like_option(text.strip())


def _read_file(path: str | Path, overrides: Sequence[str] = ()) -> list[_Entry]:
    p = Path(path)
    source = f"file '{path}'"
    if p.is_dir():
        raise ConfigError([f"config file '{path}' is a folder; give a YAML file (e.g. examples/*.yaml)"])
    if not p.is_file():
        text = str(path)
        if _looks_like_option(text):  # `opd distill train.steps 3`: an option written as two arguments
            value = overrides[0] if overrides and _bare_value(overrides[0]) else "VALUE"
            raise ConfigError([f"config file '{path}' does not exist, and {text} is an option: write {text}={value} "
                               "(one argument, no spaces around '=')"])
        raise ConfigError([f"config file '{path}' does not exist (looked in {p.resolve().parent})"])
    try:
        data = read_yaml(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError([f"{source} is not valid YAML{yaml_where(err)}"]) from None
    if data is None:
        return []
    if not isinstance(data, Mapping):
        raise ConfigError([f"{source} must hold a mapping of sections (rollout:, teacher:, ...), "
                           f"got {describe_value(data)}"])
    return _mapping_entries(data, source)


def parse_override(text: str) -> tuple[str, Any]:
    """``"route2.gamma=0.9"`` → ``("route2.gamma", 0.9)``; the value is read as a YAML 1.2 scalar,
    list (``[0.9,0.95]``) or mapping (``{math: path}``); ``null`` is None."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep and _looks_like_option(key):
        raise ConfigError([f"override {text!r} is not of the form section.key=value: write {key}=VALUE (one "
                           "argument, no spaces around '=')"])
    if not sep or not key:
        raise ConfigError([f"override {text!r} is not of the form section.key=value (e.g. route2.gamma=0.9)"])
    if not raw.strip():
        raise ConfigError([f"override {text!r} has no value; write {key}=null for none, or {key}=\"\" for an "
                           "empty string"])
    try:
        return key, read_yaml(raw)
    except yaml.YAMLError as err:
        raise ConfigError([f"override {text!r}: the value is not valid YAML{yaml_where(err)}; quote it"]) from None


def _override_entries(overrides: Sequence[str]) -> list[_Entry]:
    if isinstance(overrides, str):
        raise ConfigError([f"overrides must be a list of strings, got the string {overrides!r}"])
    entries, problems = [], []
    texts = list(overrides)
    values_of_pairs: set[int] = set()
    for i, text in enumerate(texts):
        if i in values_of_pairs:
            continue  # the `3` of `train.steps 3`, reported with its key
        nxt = texts[i + 1] if i + 1 < len(texts) else None
        if "=" not in text and _looks_like_option(text.strip()) and _bare_value(nxt):
            problems.append(f"overrides '{text}' '{nxt}' are one option written as two arguments: write "
                            f"{text.strip()}={nxt} (no spaces around '=')")
            values_of_pairs.add(i + 1)
            continue
        try:
            key, value = parse_override(text)
        except ConfigError as err:
            problems += err.problems
            continue
        entries.append(_Entry(tuple(key.split(".")), value, f"override '{text}'", raw=text.partition("=")[2]))
    if problems:
        raise ConfigError(problems)
    return entries


def _build(values: Mapping[str, Any]) -> Config:
    """A Config holding ``values`` as given (unconverted; :func:`validate.collect_problems` converts)."""
    cfg = Config()
    for path, value in values.items():
        spec = field_specs()[path]
        setattr(cfg if spec.section is None else getattr(cfg, spec.section), spec.name, value)
    return cfg


def _finish(values: Mapping[str, Any], sources: Mapping[str, str], problems: list[Problem]) -> Config:
    clean, more = collect_problems(_build(values))
    problems = problems + more
    if problems:
        raise ConfigError([format_problem(p, sources) for p in problems])
    return clean


# ---------------------------------------------------------------------------------------------
# public API
def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load, merge and validate a configuration (see the module docstring for the precedence).

    Args:
        path: a YAML file with one mapping per section (``route2: {credit: gae}``) and optionally
            ``method: NAME`` / ``seed: N``; None for the defaults (plus overrides).
        overrides: dotted ``section.key=value`` strings, applied last, in order; ``method=NAME``
            picks the preset.

    Raises:
        ConfigError: listing every problem, each with the source of the offending value.
    """
    file_entries = _read_file(path, overrides) if path is not None else []
    override_entries = _override_entries(overrides)
    method = None
    for entry in file_entries + override_entries:
        if entry.parts == ("method",):
            method = entry.value
    preset_entries: list[_Entry] = []
    if isinstance(method, str):
        if method in PRESETS:  # an unknown name is reported with the list of presets by validation
            preset = PRESETS[method]
            preset_entries = _mapping_entries(preset.values, f"preset '{method}'")
    values, sources, problems = _merge(preset_entries + file_entries + override_entries)
    return _finish(values, sources, problems)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """``cfg`` as plain data: top-level options, then one mapping per section, in schema order."""
    out: dict[str, Any] = {}
    for spec in field_specs().values():
        value = copy.deepcopy(get_value(cfg, spec.path))
        if spec.section is None:
            out[spec.name] = value
        else:
            out.setdefault(spec.section, {})[spec.name] = value
    return out


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """The Config holding exactly ``data`` (as written by :func:`config_to_dict`), validated.

    Missing options take their schema defaults; the preset named by ``method`` is **not** applied
    (``method`` is kept as a label), so ``config_from_dict(config_to_dict(cfg)) == cfg``.
    """
    if not isinstance(data, Mapping):
        raise ConfigError([f"a configuration must be a mapping, got {describe_value(data)}"])
    values, sources, problems = _merge(_mapping_entries(data, "the given mapping"))
    return _finish(values, {}, problems)


def with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A validated copy of ``cfg`` with dotted overrides applied (for sweeps); no preset is re-applied."""
    entries = _override_entries(overrides)
    if any(e.parts == ("method",) for e in entries):
        raise ConfigError(["with_overrides cannot change `method` (a preset is applied only when loading); "
                           "use load_config(path, ['method=NAME', ...])"])
    base = {spec.path: get_value(cfg, spec.path) for spec in field_specs().values()}
    values, sources, problems = _merge(entries, base)
    return _finish(values, sources, problems)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML: top-level options, then each section (schema order) under a comment.

    ``load_config(path)`` and ``config_from_dict(yaml)`` both give back an equal Config.
    """
    data = config_to_dict(cfg)
    hints = typing.get_type_hints(Config)

    def dump(obj: Mapping[str, Any]) -> str:
        return yaml.dump(dict(obj), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                         allow_unicode=True, width=1000)

    chunks = ["# opd configuration (`opd config-help` documents every option; `opd methods` the presets)\n"
              + dump({k: v for k, v in data.items() if k not in SECTIONS})]
    for section in SECTIONS:
        doc = (hints[section].__doc__ or "").strip().splitlines()[0]
        chunks.append(f"# {doc}\n" + dump({section: data[section]}))
    atomic_write_text(path, "\n".join(chunks), what="the configuration")  # a full disk names the file
