"""Name -> thing registries (timm's ``register_model`` shape), for every table of names in the project: data
sets, architectures, optimizers, surrogates, lambda schedules, samplers, pruners, metrics, artifact stores
and commands. The config's and the space's allowed names, their errors and the generated docs are read from
them, so adding an entry is one registered object and nothing else."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, Literal, TypeVar

from trainer.errors import UserError, quote

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name, in the order they were registered."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None, **attrs: object) -> Callable[[T], T]:
        """Decorator: ``@DATASETS.register("digits")`` (default name: the function's); ``attrs`` are set on
        the entry (``@DATASETS.register(shape=...)``), so what belongs to an entry is written beside it."""

        def add(entry: T) -> T:
            key = name or entry.__name__  # type: ignore[attr-defined]
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            for attr, value in attrs.items():
                setattr(entry, attr, value)
            self._entries[key] = entry
            return entry

        return add

    def unknown(self, name: object) -> str:
        """The one message for a name that is not registered: what was asked for, and what there is."""
        return f"unknown {self.kind} {quote(name)} (allowed: {', '.join(self._entries)})"

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(self.unknown(name)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._entries.items())

    def literal(self) -> object:
        """``Literal[...]`` of the registered names, for a pydantic field's allowed values."""
        return Literal[self.names()]
