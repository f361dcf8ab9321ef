"""Configuration: the schema (one section per design variable), loading, validation and presets.

    from opd.config import load_config, config_warnings
    cfg = load_config("my.yaml", ["method=vopd", "route2.gamma=0.9"])
    for warning in config_warnings(cfg):
        print("warning:", warning)

* :mod:`opd.config.schema` — the dataclasses and their documented options;
* :mod:`opd.config.load` — defaults → preset → file → overrides, YAML in and out;
* :mod:`opd.config.fields` — schema introspection and type conversion (what the others build on);
* :mod:`opd.config.validate` — types, ranges, incompatible combinations, teacher access;
* :mod:`opd.config.advice` — soft warnings (options without effect, ...);
* :mod:`opd.config.docs` — the ``opd methods`` / ``opd config-help`` texts;
* :mod:`opd.config.presets` — the published methods as named configurations (``opd methods``).
"""

from opd.config.advice import config_warnings
from opd.config.docs import format_config_help, format_methods
from opd.config.load import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_override,
    with_overrides,
)
from opd.config.presets import PRESETS, Preset
from opd.config.schema import SECTIONS, Config
from opd.config.validate import (
    check_combinations,
    required_teacher_access,
    resolve_teacher_access,
    validate_config,
)

__all__ = [
    "PRESETS", "SECTIONS", "Config", "ConfigError", "Preset", "check_combinations", "config_from_dict",
    "config_to_dict", "config_warnings", "dump_config", "format_config_help", "format_methods",
    "load_config", "parse_override", "required_teacher_access", "resolve_teacher_access",
    "validate_config", "with_overrides",
]
