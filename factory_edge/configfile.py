"""Loading YAML config files into typed models, with one-line errors.

Every error names the file, the path inside it and the problem::

    plant.yaml: devices[2].tags[5].address: must be at most 65535 (got 70000)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from .errors import ConfigError

M = TypeVar("M", bound=pydantic.BaseModel)


class YamlFloat(float):
    """A float that remembers how it was written (``40.10`` is not ``40.1`` for a bit address)."""

    text: str

    def __new__(cls, value: float, text: str) -> YamlFloat:
        obj = super().__new__(cls, value)
        obj.text = text
        return obj

    def __reduce__(self) -> tuple[Any, ...]:  # pickled: a config checked in a child process (agent/configproc.py)
        return (type(self), (float(self), self.text))


class YamlInt(int):
    """An int written with leading zeros (``00010``), which YAML 1.1 reads as octal: it remembers its text.

    Modicon register numbers start with 0 for coils (``00010`` is coil 9): their
    digits count, not YAML's octal value (8).
    """

    text: str

    def __new__(cls, value: int, text: str) -> YamlInt:
        obj = super().__new__(cls, value)
        obj.text = text
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (int(self), self.text))


class _Loader(yaml.SafeLoader):
    pass


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    value = yaml.SafeLoader.construct_yaml_float(loader, node)
    return YamlFloat(value, node.value)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    value = yaml.SafeLoader.construct_yaml_int(loader, node)
    text = str(node.value)
    if len(text) > 1 and text.startswith("0") and text.isdigit():
        return YamlInt(value, text)
    return value


_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
YamlLoader = _Loader
"""The loader config files are read with (floats keep their text)."""


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error without a line and column, in one line: ``character 49: unacceptable character #x0000 …``."""
    if isinstance(exc, yaml.reader.ReaderError):
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        return f"character {exc.position}: invalid YAML: unacceptable character {char}: {exc.reason}"
    return "invalid YAML: " + " ".join(str(exc).split())


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a missing file or a syntax error is a ConfigError naming the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str, loader: type[yaml.SafeLoader] = _Loader) -> Any:
    """Parse YAML text; a syntax error is one line, a ConfigError naming ``source`` and where."""
    try:
        return yaml.load(text, Loader=loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else "?"
        raise ConfigError(f"{source}: {where}: invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: {yaml_problem(exc)}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None


def _item_name(item: Any) -> str | None:
    """The name an item of a list goes by in a path: its ``name:``, when that is a plain, non-numeric word."""
    name = item.get("name") if isinstance(item, dict) else None
    if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name) and not name.isdigit():
        return name
    return None


def format_location(loc: tuple[Any, ...], data: Any = None) -> str:
    """``('devices', 2, 'tags', 5, 'address')`` -> ``devices[press-1].tags[spindle_temp].address``.

    An item of a list is named by its ``name:`` when ``data`` (the parsed
    file) gives it one, else by its 0-based index: ``devices[2]``.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            item = data[part] if isinstance(data, list) and 0 <= part < len(data) else None
            name = _item_name(item)
            out += f"[{name}]" if name is not None else f"[{part}]"
            data = item
        elif isinstance(part, str) and part.startswith(("function-", "modbus-", "opcua")):
            continue  # pydantic's union/validator branch names, not config keys
        else:
            out += ("." if out else "") + str(part)
            data = data.get(part) if isinstance(data, dict) else None
    return out or "(top level)"


def _describe(error: Any) -> str:
    msg = str(error["msg"])
    if msg.startswith("Input should be"):
        msg = "must be" + msg[len("Input should be") :]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if error["type"] == "extra_forbidden":
        return "unknown key (check its spelling and indentation)"
    if error["type"] == "missing":
        return "required key is missing"
    value = error.get("input")
    if (
        error["type"] not in ("model_type", "dict_type", "list_type", "union_tag_invalid")
        and not (isinstance(value, (dict, list)))
        and "got" not in msg
    ):
        msg += f" (got {value!r})" if not isinstance(value, YamlFloat) else f" (got {value.text})"
    return msg


_PATTERN_HINTS = {
    r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$": "must start with a letter or digit and hold only letters, digits, "
    "'_', '.' and '-' (it becomes an MQTT topic level)",
}


def config_errors(exc: pydantic.ValidationError, source: str, data: Any = None) -> list[str]:
    """One line per problem: ``file: path: problem`` (items named after ``data``, the parsed input)."""
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        if error["type"] == "union_tag_invalid":
            ctx = error.get("ctx", {})
            lines.append(
                f"{source}: {format_location((*loc, ctx.get('discriminator', 'protocol').strip(chr(39))), data)}: "
                f"must be one of {ctx.get('expected_tags', '?')} (got {ctx.get('tag')!r})"
            )
            continue
        if error["type"] == "string_pattern_mismatch":
            pattern = error.get("ctx", {}).get("pattern", "")
            if pattern in _PATTERN_HINTS:
                error = {**error, "msg": _PATTERN_HINTS[pattern]}
        lines.append(f"{source}: {format_location(loc, data)}: {_describe(error)}")
    return lines


def validate(model: type[M], data: Any, source: str) -> M:
    """Validate parsed YAML into ``model`` or raise a ConfigError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return model.model_validate(data, context={"source": source})
    except pydantic.ValidationError as exc:
        raise ConfigError("\n".join(config_errors(exc, source, data))) from None


def load_model(model: type[M], path: str | Path) -> M:
    """Read a YAML file and validate it into ``model``."""
    return validate(model, load_yaml(path), str(path))
