"""Validated config as plain attributes: what a long-running service holds once its config is checked.

The config models (``factory_edge.configmodel``, pydantic) check a file and
word its errors; the running agent keeps none of that machinery in memory
(about 12 MB). Each model has a plain twin, a :class:`Frozen` subclass of the
same name that the model inherits from: it declares the attributes for type
checkers and carries the properties and methods code below the CLI uses, so
that code runs the same on a model instance (``agent check-config``, tests)
and on the plain copy (``agent run``, see ``agent/configproc.py``).

    plain = thaw(model)         # a validated model → its plain twin, recursively (factory_edge.configmodel)
    device = device.replace(poll=0.5)
"""

from __future__ import annotations

import copy
from typing import Any, Self


def twin(cls: type) -> type[Frozen]:
    """The plain class of a model class (the first plain :class:`Frozen` in its MRO), or the class itself."""
    for c in cls.__mro__:
        if type(c) is type and issubclass(c, Frozen):
            return c
    raise TypeError(f"{cls.__qualname__} has no plain twin: give it one (factory_edge/frozen.py)")


class Frozen:
    """Attributes set once, compared by value; a model subclass keeps pydantic's own behaviour.

    A plain copy equals the model it was made from (pydantic's ``__eq__`` gives
    way to this one for a plain right-hand side), so a pushed configuration
    checked in a child process compares with the running one whichever way
    either was loaded.
    """

    def __init__(self, **values: Any) -> None:
        vars(self).update(values)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: use replace()")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frozen):
            return NotImplemented
        return twin(type(other)) is twin(type(self)) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((twin(type(self)).__name__, *vars(self).values()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (already valid values: nothing is checked again)."""
        new = copy.copy(self)
        vars(new).update(changes)
        return new
