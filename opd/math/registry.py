"""Named families of the math layer: one :class:`Registry` per family, kept next to the family.

A registry maps a name (the value a config option takes) to what implements it, in the order
the names are listed. The families with a registry:

=====================================  ==============================================  ===========================
family                                 registry                                        config option
=====================================  ==============================================  ===========================
per-token divergences                  :data:`opd.math.divergences.DIVERGENCES`        ``route1.divergence``
temporal credit estimators             :data:`opd.math.credit.CREDIT_ESTIMATORS`       ``route2.credit``
baselines                              :data:`opd.math.credit.BASELINES`               ``route2.baseline``
=====================================  ==============================================  ===========================

and the fixed name lists the schema reads as they are: :data:`opd.math.support.SUPPORT_KINDS`,
:data:`~opd.math.support.SUPPORT_NORMS`, :data:`opd.math.credit.VALUE_ESTIMATES`,
:data:`opd.math.rewards.REWARD_KINDS`, :data:`opd.math.routing.ROUTINGS`, ...

:meth:`Registry.names` is a *live* view: the config schema's ``choices``, ``opd config-help`` and
docs/methods.md read it, so a name registered at run time (:meth:`Registry.register`) is accepted by
the config at once and an unregistered one is refused again. CONTRIBUTING.md ("Adding a divergence",
"Adding a credit estimator") walks through adding an entry.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Generic, TypeVar, overload

__all__ = ["Names", "Registry"]

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Ordered ``name → entry`` of one family (``family`` names it in error messages).

    A read-only :class:`~collections.abc.Mapping` (iteration gives the names in order), plus
    :meth:`register` / :meth:`unregister` and :meth:`lookup` (a ``ValueError`` naming the choices).
    """

    def __init__(self, family: str, entries: Mapping[str, T]) -> None:
        self.family = family
        self._entries: dict[str, T] = dict(entries)

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.family!r}: {', '.join(self._entries)})"

    def lookup(self, name: str) -> T:
        """The entry called ``name``; a ``ValueError`` listing the registered names if there is none."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.family} {name!r}; choose one of {', '.join(self._entries)}") from None

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name`` (a new, non-empty identifier-like name); returns ``entry``."""
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"a {self.family} name must be a word of letters, digits, _ or -; got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.family} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a ``ValueError`` if it is not registered)."""
        self.lookup(name)
        del self._entries[name]

    def names(self, *, before: tuple[str, ...] = (), after: tuple[str, ...] = ()) -> "Names":
        """A live view of the registered names, with fixed ``before`` / ``after`` names around them."""
        return Names(self, before=before, after=after)


class Names(Sequence[str]):
    """The names of a :class:`Registry` now (``before`` + registered + ``after``), read at every use.

    Compares equal to a tuple or list with the same names, so it can stand where a tuple of choices
    stood.
    """

    def __init__(self, source: Mapping[str, object], *, before: tuple[str, ...] = (),
                 after: tuple[str, ...] = ()) -> None:
        self._source, self._before, self._after = source, tuple(before), tuple(after)

    def _now(self) -> tuple[str, ...]:
        return (*self._before, *self._source, *self._after)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[str, ...]: ...

    def __getitem__(self, i):
        return self._now()[i]

    def __len__(self) -> int:
        return len(self._now())

    def __iter__(self) -> Iterator[str]:
        return iter(self._now())

    def __contains__(self, name: object) -> bool:
        return name in self._now()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Names, tuple, list)):
            return self._now() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._now())

    def __repr__(self) -> str:
        return repr(self._now())
