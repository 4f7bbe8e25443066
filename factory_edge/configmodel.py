"""The base of every config model (agent, drivers, bridge): strict, frozen, with durations and names.

Parsed once from YAML (``factory_edge.configfile``); code below the CLI only
ever sees these frozen models.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

from .frozen import twin
from .units import parse_duration

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
"""Gateway, device, tag and rule names become MQTT topic levels: no ``/``, ``+``, ``#`` or spaces."""

Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds, written ``500ms``, ``1s``, ``5m`` (or a plain number of seconds)."""


class Model(BaseModel):
    """Base of config models: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def thaw(value: Any) -> Any:
    """A validated model → its plain twin (``factory_edge.frozen``), recursively; lists, dicts and the rest as they are.

    The twin is the first class in the model's MRO that is a plain :class:`~factory_edge.frozen.Frozen`.
    """
    if isinstance(value, BaseModel):
        plain = twin(type(value))
        out = plain.__new__(plain)
        vars(out).update({name: thaw(getattr(value, name)) for name in type(value).model_fields})
        return out
    if isinstance(value, list):
        return [thaw(v) for v in value]
    if isinstance(value, dict):
        return {k: thaw(v) for k, v in value.items()}
    return value
