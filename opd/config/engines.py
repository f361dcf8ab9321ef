"""The rollout engines by name: the table ``rollout.engine`` chooses from.

It lives with the configuration, below the engines: the schema reads the names from it, and
:func:`opd.rollout.engine.build_engine` looks the chosen name up in it. The entries are strings, so the
configuration imports no engine (an engine's optional dependencies are imported only by the runs
that use it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

__all__ = ["ENGINES", "ENGINE_NAMES"]

#: ``rollout.engine`` name → ``"module:factory"`` (an :data:`opd.rollout.engine.EngineFactory`, imported when the engine is
#: built, so an engine's optional dependencies are imported only by the runs that use it).
ENGINES: dict[str, str] = {
    "hf": "opd.rollout.engine:hf_engine",
    "vllm": "opd.rollout.vllm_engine:vllm_engine",
}


class _Names(Sequence[str]):
    """The keys of :data:`ENGINES`, read when asked (the config's choices of ``rollout.engine``)."""

    def __getitem__(self, i):  # type: ignore[override]
        return tuple(ENGINES)[i]

    def __len__(self) -> int:
        return len(ENGINES)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(ENGINES))

    def __contains__(self, name: object) -> bool:
        return name in ENGINES

    def __repr__(self) -> str:
        return repr(tuple(ENGINES))


#: The names of the engines, always those of :data:`ENGINES` (``rollout.engine``'s choices).
ENGINE_NAMES: Sequence[str] = _Names()
