"""Profiles, tag ranges and register notations: the config as written, expanded into plain devices and tags.

A plant has many machines of one model and machines with long, regular
register maps. The agent's config says each once:

- ``profiles:`` (top level) maps a profile name to device keys and tags;
  a device with ``profile: NAME`` starts from that profile and overrides
  any key (typically ``name``, ``host``, ``unit``). Its own ``tags`` are
  added to the profile's; a tag with a profile tag's name replaces it.
- A tag entry with ``addresses: 0-999`` (or ``address:`` and ``count:``,
  with an optional ``stride:``) is a *range*: one tag per element, named
  by a template (``name: "r{address}"``). ``{address}`` is the element's
  address as written in the file, ``{i}`` its 0-based and ``{n}`` its
  1-based index; ``description`` may use them too. ``stride`` defaults to
  the width of one element (2 registers for a float32), so ``addresses:
  0-999`` of ``uint16`` is 1,000 tags and a structure of 10 registers per
  pump is ``address: 1000, count: 8, stride: 10``.
- ``addressing: modicon`` (a Modbus device's or a profile's key) means
  every ``address`` of that device is written in the 1-based register
  notation of PLC manuals: 5 digits (``40001``: holding register 0) or 6
  digits (``400001``: holding register 0), the leading digit naming the
  table (0 coil, 1 discrete input, 3 input register, 4 holding register).
  The default, ``addressing: protocol``, takes the 0-based address sent on
  the wire: one file never mixes the two, so ``40001`` is never guessed at.

This is a pure function over the parsed YAML, run before validation, so
every later check (types, limits, the read plan) sees the same plain
devices and tags as a hand-written file would give. Problems are one line
each: ``file: devices[press-2].profile: no profile 'pres' (profiles: press)``.
"""

from __future__ import annotations

import re
from typing import Any

from drivers.configtypes import REGISTERS_PER_TYPE, DataType
from factory_edge.configfile import YamlFloat, YamlInt
from factory_edge.errors import ConfigError

MAX_RANGE_TAGS = 65536
MAX_TAGS = 100_000  # in one config, expanded: a 1 KB file must not ask a small gateway for gigabytes
TEMPLATE_FIELDS = ("address", "i", "n")
RANGE_KEYS = ("addresses", "count", "stride")
MODICON_TABLES = {"0": "coil", "1": "discrete", "3": "input", "4": "holding"}
BIT_TABLES = ("coil", "discrete")


class _Problems:
    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[str] = []
        self.tags = 0  # expanded so far, across devices

    def add(self, where: str, problem: str) -> None:
        self.lines.append(f"{self.source}: {where}: {problem}")


def _label(items: Any, index: int, what: str) -> str:
    item = items[index] if isinstance(items, list) and 0 <= index < len(items) else None
    name = item.get("name") if isinstance(item, dict) else None
    if isinstance(name, str) and name and "{" not in name and not name.isdigit():
        return f"{what}[{name}]"
    return f"{what}[{index}]"


def expand(data: Any, source: str) -> Any:
    """The config with profiles applied, ranges expanded and Modicon addresses converted; ConfigError lists why not.

    ``data`` is not modified. Anything not a mapping is returned as-is
    (validation reports it).
    """
    if not isinstance(data, dict):
        return data
    problems = _Problems(source)
    profiles = data.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"{source}: profiles: must be a mapping of profile names to device keys and tags")
    for name, profile in profiles.items():
        if not isinstance(profile, dict):
            problems.add(f"profiles.{name}", "must be a mapping of device keys and tags")
        elif "name" in profile or "profile" in profile:
            problems.add(f"profiles.{name}.{'name' if 'name' in profile else 'profile'}", "not allowed in a profile")
    devices = data.get("devices")
    if not isinstance(devices, list):
        if problems.lines:
            raise ConfigError("\n".join(problems.lines))
        return data
    out = []
    for index, device in enumerate(devices):
        where = _label(devices, index, "devices")
        if isinstance(device, dict):
            device = _apply_profile(device, profiles, where, problems)
            device = _expand_tags(device, where, problems)
        out.append(device)
    if problems.lines:
        raise ConfigError("\n".join(problems.lines))
    return {**data, "devices": out}


def _apply_profile(device: dict[str, Any], profiles: dict[str, Any], where: str, problems: _Problems) -> dict[str, Any]:
    name = device.get("profile")
    if name is None:
        return device
    profile = profiles.get(name) if isinstance(name, str) else None
    if not isinstance(profile, dict):
        known = ", ".join(sorted(map(str, profiles))) or "none defined"
        problems.add(f"{where}.profile", f"no profile {name!r} (profiles: {known})")
        return device
    merged = {**profile, **device}
    own = device.get("tags") or []
    base = profile.get("tags") or []
    if isinstance(own, list) and isinstance(base, list):
        names = {t.get("name") for t in own if isinstance(t, dict)}
        merged["tags"] = [t for t in base if not (isinstance(t, dict) and t.get("name") in names)] + own
    return merged


def _expand_tags(device: dict[str, Any], where: str, problems: _Problems) -> dict[str, Any]:
    tags = device.get("tags")
    addressing = device.get("addressing", "protocol")
    if addressing not in ("protocol", "modicon"):
        problems.add(f"{where}.addressing", f"must be protocol or modicon (got {addressing!r})")
        addressing = "protocol"
    if not isinstance(tags, list):
        return device
    modbus = str(device.get("protocol", "")).startswith("modbus")
    out: list[Any] = []
    for index, tag in enumerate(tags):
        tag_where = f"{where}.{_label(tags, index, 'tags')}"
        if not isinstance(tag, dict):
            out.append(tag)
            continue
        is_range = any(k in tag for k in RANGE_KEYS)
        if is_range and not modbus:
            key = next(k for k in RANGE_KEYS if k in tag)
            problems.add(f"{tag_where}.{key}", "ranges are for Modbus registers; list OPC UA nodes one by one")
            continue
        elements = _range(tag, tag_where, problems, modicon=addressing == "modicon") if is_range else [tag]
        if modbus and addressing == "modicon":
            converted = []
            for element in elements:
                one = _from_modicon(element, f"{where}.tags[{element.get('name', index)}]", problems)
                if one is None:
                    break  # one line for a range, not one per element
                converted.append(one)
            elements = converted
        problems.tags += len(elements)
        if problems.tags > MAX_TAGS:  # stop here: expanding the rest could exhaust the memory
            problems.add(
                tag_where,
                f"the configuration expands to more than {MAX_TAGS} tags here (profiles and ranges counted "
                f"for each device); at most {MAX_TAGS} on one gateway",
            )
            raise ConfigError("\n".join(problems.lines))
        out.extend(elements)
    return {**device, "tags": out}


def _parse_span(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    match = re.fullmatch(r"\s*(\d+)\s*(?:-|\.\.)\s*(\d+)\s*", str(value)) if isinstance(value, str) else None
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def _width(tag: dict[str, Any]) -> int:
    """Registers (or bits) one element of a range occupies: what ``stride`` defaults to."""
    if tag.get("table") in BIT_TABLES:
        return 1
    try:
        kind = DataType(tag.get("type") or "uint16")
    except ValueError:
        return 1  # validation names the type
    if kind is DataType.STRING:
        length = tag.get("length")
        return length if isinstance(length, int) and length > 0 else 1
    return REGISTERS_PER_TYPE[kind]


def _range(tag: dict[str, Any], where: str, problems: _Problems, *, modicon: bool) -> list[dict[str, Any]]:
    name = tag.get("name")
    if not isinstance(name, str) or not any("{" + f + "}" in name for f in TEMPLATE_FIELDS):
        problems.add(
            f"{where}.name",
            f"a range's name is a template with {{address}}, {{i}} or {{n}}, like r{{address}} (got {name!r})",
        )
        return []
    if "bit" in tag or (isinstance(tag.get("address"), (float, str)) and "." in str(tag.get("address"))):
        problems.add(f"{where}.bit", "a range steps over whole registers; list bits of a register one by one")
        return []
    stride = tag.get("stride", _width(tag))
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        problems.add(f"{where}.stride", f"must be a whole number of registers, at least 1 (got {stride!r})")
        return []
    if "addresses" in tag:
        if "address" in tag or "count" in tag:
            problems.add(f"{where}.addresses", "give addresses: A-B, or address: and count:, not both")
            return []
        span = _parse_span(tag["addresses"])
        if span is None or span[1] < span[0]:
            problems.add(f"{where}.addresses", f"expected a range like 0-999 (got {tag['addresses']!r})")
            return []
        first, last = span
        written = re.match(r"\s*(\d+)", str(tag["addresses"]))
        digits = len(written.group(1)) if written else 0
        if (last - first + 1) % stride:
            problems.add(
                f"{where}.addresses",
                f"{first}-{last} is {last - first + 1} addresses, not a whole number of elements of {stride} (stride)",
            )
            return []
        count = (last - first + 1) // stride
    else:
        start, number = tag.get("address"), tag.get("count")
        if not isinstance(start, int) or isinstance(start, bool):
            problems.add(f"{where}.address", f"a range with count: needs a start address: (got {start!r})")
            return []
        if not isinstance(number, int) or isinstance(number, bool) or number < 1:
            problems.add(f"{where}.count", f"must be a whole number, at least 1 (got {number!r})")
            return []
        # 00010 (coil 9 in Modicon notation) is the octal 8 to YAML: its digits count, as written.
        first, count = (int(start.text) if modicon and isinstance(start, YamlInt) else int(start)), number
        digits = len(start.text) if isinstance(start, YamlInt) else len(str(start))
    if count > MAX_RANGE_TAGS:
        problems.add(where, f"{count} tags in one range; at most {MAX_RANGE_TAGS}")
        return []
    end = first + (count - 1) * stride + _width(tag) - 1
    if not modicon and end > 65535:
        problems.add(
            f"{where}.{'addresses' if 'addresses' in tag else 'count'}",
            f"the range runs to address {end}, past the last one, 65535 (0-based protocol address)",
        )
        return []
    base = {k: v for k, v in tag.items() if k not in (*RANGE_KEYS, "address", "name", "description")}
    description = tag.get("description")
    out = []
    for i in range(count):
        address = first + i * stride
        values = {"address": address, "i": i, "n": i + 1}
        # Modicon: each element's number has as many digits as the start as written (00001-00016: coils).
        element = {**base, "name": _fill(name, values), "address": str(address).zfill(digits) if modicon else address}
        if isinstance(description, str):
            element["description"] = _fill(description, values)
        out.append(element)
    return out


def _fill(template: str, values: dict[str, int]) -> str:
    return re.sub(r"\{(address|i|n)\}", lambda m: str(values[m.group(1)]), template)


def _from_modicon(tag: dict[str, Any], where: str, problems: _Problems) -> dict[str, Any] | None:
    """``address: 40001`` (or ``400001``) → ``table: holding, address: 0``; ``40001.3`` keeps bit 3."""
    raw = tag.get("address")
    if raw is None:
        return tag  # validation says it is missing
    text = raw.text if isinstance(raw, (YamlFloat, YamlInt)) else str(raw)
    register, dot, bit = text.strip().partition(".")
    if isinstance(raw, bool) or not register.isdigit() or (dot and not bit.isdigit()):
        problems.add(f"{where}.address", f"expected a Modicon register number like 40001 or 400001 (got {text})")
        return None
    digits = register  # never padded: 1 is not guessed to be 00001 (coil 0)
    if len(digits) == 5:
        prefix, number, limit = digits[0], int(digits[1:]), 9999
    elif len(digits) == 6:
        prefix, number, limit = digits[0], int(digits[1:]), 65536
    else:
        problems.add(
            f"{where}.address",
            f"{text} is not 5- or 6-digit Modicon notation (addressing: modicon): "
            "40001 or 400001 is holding register 0",
        )
        return None
    table = MODICON_TABLES.get(prefix)
    if table is None or not 1 <= number <= limit:
        problems.add(
            f"{where}.address",
            f"{text} is not a Modicon register (addressing: modicon): the first digit names the table "
            f"(0 coil, 1 discrete, 3 input, 4 holding), the rest counts from 1 up to {limit}",
        )
        return None
    given = tag.get("table")
    if given is not None and given != table:
        problems.add(f"{where}.table", f"{given} disagrees with address {text}, a {table} register in Modicon notation")
        return None
    out = {**tag, "table": table, "address": number - 1}
    if dot:
        if tag.get("bit") is not None and tag["bit"] != int(bit):
            problems.add(f"{where}.bit", f"address {text} and bit {tag['bit']} disagree")
            return None
        out["bit"] = int(bit)
    return out
