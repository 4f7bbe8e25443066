"""Alert messages: ``"{device} spindle at {value:.1f} degC (limit {threshold})"``.

Only the names below may appear, with an optional format spec; attribute
and index access are refused when the config is loaded, so a template can
never reach into the bridge's objects.
"""

from __future__ import annotations

import string
from datetime import UTC, datetime
from typing import Any

FIELDS = ("rule", "state", "severity", "tenant", "gw", "device", "tag", "value", "condition", "threshold", "since")
DEFAULTS = {
    "value": "{device} {tag} = {value} ({condition})",
    "rate": "{device} {tag} changing too fast: {value} ({condition})",
    "stale": "{device}: {condition}",
    "offline": "gateway {gw} is offline",
}
_formatter = string.Formatter()


def check_template(text: str) -> str:
    """ValueError naming the problem when ``text`` is not a valid message template."""
    try:
        parts = list(_formatter.parse(text))
    except ValueError as exc:
        raise ValueError(f"invalid message template: {exc}") from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in FIELDS:
            raise ValueError(f"message: unknown field {{{name}}} (known: {', '.join(FIELDS)})")
        if conversion:
            raise ValueError(f"message: {{{name}!{conversion}}}: conversions are not supported")
        if spec and "{" in spec:
            raise ValueError(f"message: {{{name}:{spec}}}: nested fields are not supported")
    return text


def render(text: str, values: dict[str, Any]) -> str:
    """Fill a checked template; a format spec that does not fit the value falls back to plain text."""
    out = []
    for literal, name, spec, _ in _formatter.parse(text):
        out.append(literal)
        if name is None:
            continue
        value = values.get(name)
        if name == "since" and isinstance(value, int):
            value = datetime.fromtimestamp(value / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        try:
            out.append(format(value, spec or ""))
        except (ValueError, TypeError):
            out.append(str(value))
    return "".join(out)
