"""One way to make a pluggable component available by name: sources, filters, fine-tune methods,
samplers and downstream methods each have a `Registry`, and a new component is one class (or
function) registered once where it is defined::

    FILTERS = Registry("filter", "filter.kind")

    @FILTERS.register("brightness")
    class BrightnessFilter(ImageFilter): ...

Config validation and the build's check phase ask the registry which names exist
(`names()`, `check(name)`), so a component registered by a user's module is accepted by the same
config key as a built-in one, with no list of names to keep in step anywhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownComponent(KeyError):
    """A name no component of the registry was registered under."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0])


class Registry(Generic[T]):
    """Components of one kind by name. `what` names the kind in messages ("filter"), `key` the
    config key that selects one ("filter.kind")."""

    def __init__(self, what: str, key: str) -> None:
        self.what, self.key = what, key
        self._items: dict[str, T] = {}

    def register(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
        """Decorator: register the decorated class or function under `name` and return it as it is.
        A second registration of a name is an error unless `replace` (a test or plug-in overriding
        a built-in on purpose)."""

        def add(component: T) -> T:
            self.add(name, component, replace=replace)
            return component

        return add

    def add(self, name: str, component: T, *, replace: bool = False) -> T:
        if not name or name != name.strip():
            raise ValueError(f"a {self.what} name must be a non-empty word, got {name!r}")
        if name in self._items and not replace:
            raise ValueError(f"a {self.what} named {name!r} is already registered ({self._items[name]!r})")
        self._items[name] = component
        return component

    def remove(self, name: str) -> None:
        """Unregister `name` (a test cleaning up the component it registered)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownComponent(self.unknown(name)) from None

    def check(self, name: str) -> str:
        """`name` if registered, else `ValueError` with the message of `unknown` (for validators)."""
        if name not in self._items:
            raise ValueError(self.unknown(name))
        return name

    def unknown(self, name: str) -> str:
        return f"{self.key}: unknown {self.what} {name!r} (registered: {', '.join(self.names()) or 'none'})"

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._items.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self.names())})"
