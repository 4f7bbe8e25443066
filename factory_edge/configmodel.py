"""The base of every config model (agent, drivers, bridge): strict, frozen, with durations and names.

Parsed once from YAML (``factory_edge.configfile``); code below the CLI only
ever sees these frozen models.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict

from .units import parse_duration

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
"""Gateway, device, tag and rule names become MQTT topic levels: no ``/``, ``+``, ``#`` or spaces."""

Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds, written ``500ms``, ``1s``, ``5m`` (or a plain number of seconds)."""


class Model(BaseModel):
    """Base of config models: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
