"""The ``opd`` command; each sub-command lives in its own module under :mod:`opd.commands`.

    opd distill [CONFIG.yaml] [section.key=value ...]   run on-policy distillation
    opd distill --resume RUN_DIR                        continue a stopped run exactly
    opd eval MODEL [--task arith | --prompts FILE.jsonl] evaluate a checkpoint
    opd methods                                         list the method presets
    opd config-help [SECTION]                           every option with its documentation
    opd bias-lab [--vocab 3 --horizon 4 ...]            exact bias/variance of the estimators
    opd report RUN_DIR [RUN_DIR ...]                    HTML + Markdown report (compare runs)
    opd make-checkpoints FAMILY                         regenerate shipped checkpoints (arith, cases, ...)
    opd make-student TEACHER OUT --keep N               a smaller student by depth pruning

Errors a user can cause (a bad config, a missing file, an unreadable input) end in one line on
stderr and exit status 2; ``OPD_TRACEBACK=1`` shows the traceback behind them.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from opd.commands import load_commands
from opd.errors import RunFault
from opd.threads import set_openmp_defaults


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the command's docstring as written (its examples on their own lines) and appends a
    default to an option's help only when there is one worth showing and the help does not state it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and default is not None and default is not False
                and default != argparse.SUPPRESS and "default" not in text):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd", description="On-policy distillation of language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in load_commands():
        if getattr(module, "RAW_ARGV", False):  # parses its own arguments; listed for `opd --help`
            sub.add_parser(module.NAME, help=module.HELP, add_help=False)
            continue
        description = (module.__doc__ or "").replace("``", "`")
        p = sub.add_parser(module.NAME, help=module.HELP, description=description, formatter_class=_HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # per-file "Loading weights" bars drown the run's own progress bar; transformers reads this
    # variable when it is first imported, so setting it costs no import here
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    set_openmp_defaults()  # a short OpenMP spin (opd.threads); read when torch loads, so before any command runs
    raw = {m.NAME: m for m in load_commands() if getattr(m, "RAW_ARGV", False)}
    if argv and argv[0] in raw:  # sub-commands with their own argparse get the rest of the line
        return raw[argv[0]].run(argv[1:])
    args = _parse(build_parser(), argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `opd methods | head`: the reader left; not an error (Python's documented idiom)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError, RunFault) as err:  # bad input, paths, servers: say what and how, no traceback
        if os.environ.get("OPD_TRACEBACK") == "1":
            raise
        print(f"opd {args.command}: error: {err}", file=sys.stderr)
        print("(set OPD_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C outside a run's own handling: one line, the shell's status
        if os.environ.get("OPD_TRACEBACK") == "1":
            raise
        print(f"\nopd {args.command}: interrupted" + (f": {err}" if str(err) else ""), file=sys.stderr)
        return 128 + signal.SIGINT


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args``, except that ``key=value`` overrides may also follow options
    (``opd sweep SPEC --jobs 1 train.steps=50``): argparse takes the positionals before the first
    option only, so the rest are added to the command's ``overrides`` here."""
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and not any(e.startswith("-") for e in extra):
        args.overrides.extend(extra)
    elif extra:
        parser.parse_args(argv)  # argparse's own message and exit status for what is left
    return args


if __name__ == "__main__":
    sys.exit(main())
