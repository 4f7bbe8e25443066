"""The bridge's pure logic, without I/O: decoding, mapping rules, alert rules and the alert engine."""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.alerts.engine import AlertEngine
from bridge.alerts.model import GATEWAY_DEVICE, State
from bridge.alerts.rules import AlertRule
from bridge.alerts.template import render
from bridge.alerts.webhooks import sign, verify
from bridge.config import BridgeConfig
from bridge.decode import decode_batch, decode_event, decode_meta, decode_status
from bridge.mapping import Mapping, MappingRule, topic_matches
from bridge.messages import Malformed, Received
from bridge.router import Router, plan
from factory_edge.configfile import validate
from factory_edge.errors import ConfigError

GW, DEV = "gw-01", "press-1"


def payload(**overrides: Any) -> bytes:
    doc = {
        "v": 1,
        "gw": GW,
        "dev": DEV,
        "seq": 7,
        "points": [
            {"tag": "temp", "ts": 1_700_000_000_000, "v": 71.5, "q": "good"},
            {"tag": "recipe", "ts": 1_700_000_000_001, "v": "PN-7", "q": "good"},
            {"tag": "door", "ts": 1_700_000_000_002, "v": True, "q": "good"},
            {"tag": "flow", "ts": 1_700_000_000_003, "v": None, "q": "bad", "err": "timeout"},
        ],
    }
    doc.update(overrides)
    return json.dumps(doc).encode()


# ---------------------------------------------------------------- the built-in mapping


def test_a_batch_decodes_into_rows_with_gateway_and_device_from_the_topic() -> None:
    batch = decode_batch(GW, DEV, payload(), 123)
    assert batch.seq == 7
    assert batch.rows == [
        (GW, DEV, "temp", 1_700_000_000_000, 71.5, "good", None, 7),
        (GW, DEV, "recipe", 1_700_000_000_001, "PN-7", "good", None, 7),
        (GW, DEV, "door", 1_700_000_000_002, True, "good", None, 7),
        (GW, DEV, "flow", 1_700_000_000_003, None, "bad", "timeout", 7),
    ]


def test_numbers_read_exactly_whichever_parser_reads_them() -> None:
    """A float beyond 2**63 stays a float; a byte order mark is accepted as before."""
    batch = decode_batch(
        GW,
        DEV,
        payload(
            points=[{"tag": "t", "ts": 1, "v": 1e19, "q": "good"}, {"tag": "u", "ts": 2, "v": -(2**63), "q": "good"}]
        ),
        0,
    )
    assert [r[4] for r in batch.rows] == [1e19, -(2**63)] and type(batch.rows[1][4]) is int
    assert decode_batch(GW, DEV, b"\xef\xbb\xbf" + payload(), 0).rows == decode_batch(GW, DEV, payload(), 0).rows


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{not json", "invalid JSON: Expecting property name enclosed in double quotes at byte 1"),
        (b"[1, 2]", "payload must be a JSON object, got array"),
        (b'\xff\xfe{"v":1}', "invalid JSON"),
        (payload(v=2), "v: unsupported batch format 2 (this bridge reads v=1)"),
        (payload(gw="gw-02"), "gw: payload says 'gw-02' but the topic's gateway is 'gw-01'"),
        (payload(dev="press-2"), "dev: payload says 'press-2' but the topic's device is 'press-1'"),
        (payload(seq=-1), "seq: must be a non-negative 64-bit integer, got -1"),
        (payload(seq=2**63), "seq: must be a non-negative 64-bit integer"),
        (payload(seq="7"), "seq: must be a non-negative 64-bit integer, got '7'"),
        (payload(points={"tag": "x"}), "points: must be an array, got object"),
        (payload(points=[{"tag": "a b", "ts": 1, "v": 1}]), "points[0].tag: 'a b' is not a valid tag name"),
        (
            payload(points=[{"tag": "température", "ts": 1, "v": 1}]),
            "points[0].tag: 'température' is not a valid tag name",
        ),
        (
            payload(points=[{"tag": "t", "ts": 1.5, "v": 1}]),
            "points[0].ts: must be an integer (epoch milliseconds), got number",
        ),
        (
            payload(points=[{"tag": "t", "ts": 10**16, "v": 1}]),
            "points[0].ts: 10000000000000000 is not an epoch time in milliseconds",
        ),
        (payload(points=[{"tag": "t", "ts": 1}]), "points[0].v: missing (use null for no value)"),
        (
            payload(points=[{"tag": "t", "ts": 1, "v": [1]}]),
            "points[0].v: must be a number, text, true/false or null (got array)",
        ),
        (
            payload(points=[{"tag": "t", "ts": 10**25, "v": 1}]),
            "points[0].ts: 10000000000000000000000000 is not an epoch",
        ),
        (payload(seq=10**25), "seq: must be a non-negative 64-bit integer, got 10000000000000000000000000"),
        (
            payload(points=[{"tag": "t", "ts": 1, "v": 1, "q": "fine"}]),
            "points[0].q: must be good, bad or uncertain, got 'fine'",
        ),
        (payload(points=[{"tag": "t", "ts": 1, "v": 1, "err": 5}]), "points[0].err: must be text, got integer"),
        (
            b'{"v":1,"gw":"gw-01","dev":"press-1","seq":1,"points":[{"tag":"t","ts":1,"v":NaN}]}',
            "invalid JSON: NaN is not a JSON number",
        ),
        (b"[" * 100_000, "invalid JSON: nested too deeply"),
    ],
)
def test_a_malformed_batch_is_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(Malformed) as caught:
        decode_batch(GW, DEV, data, 0)
    assert caught.value.reason.startswith(reason)


@pytest.mark.parametrize(
    ("point", "reason"),
    [
        ({"tag": "t", "ts": 1, "v": 2**64}, "points[1].v: integer out of the 64-bit range"),
        ({"tag": "t", "ts": 1, "v": 10**25}, "points[1].v: integer out of the 64-bit range"),
        ({"tag": "t", "ts": 1, "v": "a\u0000b"}, "points[1].v: contains a NUL character"),
        ({"tag": "t", "ts": 1, "v": 1e400}, "points[1].v: inf is not a finite number"),
        ({"tag": "t", "ts": 1, "v": "\ud800"}, "points[1].v: not valid Unicode text (lone surrogate)"),
    ],
)
def test_a_value_no_store_can_hold_makes_its_reading_bad_not_the_batch(point: dict[str, object], reason: str) -> None:
    data = payload(points=[{"tag": "ok", "ts": 1, "v": 7.5, "q": "good"}, point])
    if point["v"] == 1e400:
        data = data.replace(b"Infinity", b"1e400")
    rows = decode_batch(GW, DEV, data, 0).rows
    assert rows[0][2:6] == ("ok", 1, 7.5, "good")
    assert rows[1][4:7] == (None, "bad", f"refused by the bridge: {reason}")


def test_status_and_events_decode() -> None:
    status = decode_status(GW, b'{"state":"offline","ts":5,"version":"0.1.0","config_hash":"ab"}', 9)
    assert (status.state, status.ts, status.version, status.received_at) == ("offline", 5, "0.1.0", 9)
    with pytest.raises(Malformed, match="state: must be online or offline"):
        decode_status(GW, b'{"state":"sleepy","ts":5}', 9)
    event = decode_event(GW, b'{"type":"device_down","ts":5,"device":"press-1"}', 9)
    assert (event.type, event.ts, json.loads(event.payload)["device"]) == ("device_down", 5, "press-1")
    assert event.digest == decode_event(GW, b'{"type": "device_down", "ts": 5, "device": "press-1"}', 10).digest


def test_the_status_carries_the_agents_buffer_figures() -> None:
    doc = {"state": "online", "ts": 5, "version": "0.1.0"}
    assert decode_status(GW, json.dumps(doc).encode(), 9).buffer is None  # an agent that reports none
    figures = {"ts": 7, "pending_batches": 3, "pending_points": 30, "unconfirmed_batches": 2, "dropped_points": 40}
    status = decode_status(GW, json.dumps(doc | {"buffer": figures | {"oldest_pending_ts": 4}}).encode(), 9)
    assert status.buffer is not None
    assert (status.buffer.ts, status.buffer.pending_batches, status.buffer.unconfirmed_batches) == (7, 3, 2)
    assert (status.buffer.dropped_points, status.buffer.oldest_pending_ts, status.buffer.oldest_unconfirmed_ts) == (
        40,
        4,
        None,
    )
    for bad, reason in (
        ([], "buffer: must be an object, got array"),
        ({"pending_batches": -1}, "buffer.pending_batches: must be an integer >= 0, got -1"),
        ({"dropped_points": "many"}, "buffer.dropped_points: must be an integer >= 0, got 'many'"),
        ({"oldest_pending_ts": 1.5}, "buffer.oldest_pending_ts: must be an integer (epoch milliseconds), got number"),
    ):
        with pytest.raises(Malformed) as caught:
            decode_status(GW, json.dumps(doc | {"buffer": bad}).encode(), 9)
        assert caught.value.reason == reason


def test_meta_keeps_each_tags_unit_and_description() -> None:
    doc = {
        "device": DEV,
        "protocol": "modbus-tcp",
        "tags": [
            {"name": "oil_temp", "type": "float32", "unit": "degC", "description": "tank", "writable": False},
            {"name": "setpoint", "type": None, "unit": None, "writable": True},
        ],
    }
    meta = decode_meta(GW, DEV, json.dumps(doc).encode(), 9)
    assert (meta.gw, meta.device, meta.received_at) == (GW, DEV, 9)
    assert meta.tags is not None and json.loads(meta.tags) == [
        {"name": "oil_temp", "type": "float32", "unit": "degC", "description": "tank", "writable": False},
        {"name": "setpoint", "type": None, "unit": None, "description": None, "writable": True},
    ]
    assert decode_meta(GW, DEV, b"", 9).tags is None  # the retained meta cleared: the device left the config
    for bad, reason in (
        ({"tags": {}}, "tags: must be a list, got object"),
        ({"tags": [{"name": "a b"}]}, "tags[0].name: 'a b' is not a valid name"),
        ({"tags": [{"name": "t", "unit": 5}]}, "tags[0].unit: must be text, got integer"),
    ):
        with pytest.raises(Malformed, match=re.escape(reason)):
            decode_meta(GW, DEV, json.dumps(bad).encode(), 9)


points_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "tag": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,20}", fullmatch=True),
            "ts": st.integers(0, 253_402_300_799_999),
            "v": st.none()
            | st.booleans()
            | st.integers(-(2**63), 2**63 - 1)
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00")),
            "q": st.sampled_from(["good", "bad", "uncertain"]),
        }
    ),
    max_size=20,
)


@given(points=points_strategy, seq=st.integers(0, 2**63 - 1))
def test_every_valid_batch_decodes_exactly(points: list[dict[str, Any]], seq: int) -> None:
    data = json.dumps({"v": 1, "gw": GW, "dev": DEV, "seq": seq, "points": points}, ensure_ascii=False).encode()
    batch = decode_batch(GW, DEV, data, 0)
    assert [(r[2], r[3], r[4], r[5]) for r in batch.rows] == [(p["tag"], p["ts"], p["v"], p["q"]) for p in points]


@given(
    data=st.binary(max_size=300)
    | st.text(max_size=300).map(str.encode)
    | st.recursive(
        st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
        max_leaves=20,
    ).map(lambda d: json.dumps(d).encode())
)
def test_anything_either_decodes_or_is_malformed(data: bytes) -> None:
    for decode in (
        lambda: decode_batch(GW, DEV, data, 0),
        lambda: decode_status(GW, data, 0),
        lambda: decode_meta(GW, DEV, data, 0),
        lambda: decode_event(GW, data, 0),
    ):
        try:
            decode()
        except Malformed as exc:
            assert exc.reason and "\n" not in exc.reason


# ---------------------------------------------------------------- user mappings


def mapping(**rule: Any) -> Mapping:
    return Mapping.of(MappingRule.model_validate(rule))


def test_a_mapping_extracts_wildcards_fields_types_and_the_timestamp() -> None:
    m = mapping(
        topic="plant/{line}/{machine}/temp",
        table="temps",
        fields={
            "value": {"path": "$.value", "type": "float"},
            "unit": "$.meta.unit",
            "ok": {"path": "$.flags[1]", "type": "bool"},
            "ts": "$.time",
        },
    )
    row = m.row(
        "plant/l2/m7/temp",
        b'{"value": "71.25", "meta": {"unit": "degC"}, "flags": [0, "on"], "time": "2024-11-22T12:00:00Z"}',
        99,
    )
    assert row == {
        "line": "l2",
        "machine": "m7",
        "value": 71.25,
        "unit": "degC",
        "ok": True,
        "ts": 1732276800000,
        "received_at": 99,
    }
    assert m.rule.columns == ("line", "machine", "value", "unit", "ok", "ts", "received_at")


def test_a_mapping_without_ts_uses_the_arrival_time_and_text_payloads_work() -> None:
    m = mapping(topic="plant/+/counter", table="counters", payload="text", fields={"count": {"type": "int"}})
    assert m.row("plant/x/counter", b"42", 5) == {"count": 42, "ts": 5, "received_at": 5}
    with pytest.raises(Malformed, match=r"fields.count: expected a number, got 'many'"):
        m.row("plant/x/counter", b"many", 5)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{}", "fields.value: $.value not found in the payload"),
        (b'{"value": "hot"}', "fields.value: expected a number, got 'hot'"),
        (b'{"value": 1e400}', "fields.value: inf is not a finite number"),
        (b'{"value": 1, "ts": "yesterday"}', "fields.ts: expected epoch ms or an ISO 8601 time, got 'yesterday'"),
        (b"not json", "invalid JSON"),
    ],
)
def test_a_payload_that_does_not_fit_the_mapping_is_malformed(data: bytes, reason: str) -> None:
    m = mapping(
        topic="plant/{line}/temp", table="temps", fields={"value": {"path": "$.value", "type": "float"}, "ts": "$.ts"}
    )
    with pytest.raises(Malformed) as caught:
        m.row("plant/l1/temp", data, 0)
    assert caught.value.reason.startswith(reason)


@pytest.mark.parametrize(
    ("rule", "error"),
    [
        ({"topic": "plant/{line}/{line}", "table": "t"}, "the name is used twice"),
        ({"topic": "plant/#/x", "table": "t"}, "'#' must be the last level"),
        ({"topic": "plant/a{b}", "table": "t"}, "use {name}, + or # as a whole level"),
        ({"topic": "plant/x", "table": "points"}, "'points' is one of the bridge's own tables"),
        ({"topic": "plant/x", "table": "samples_20261203"}, "'samples_20261203' is one of the bridge's own tables"),
        ({"topic": "plant/x", "table": "Temps"}, "must be a lowercase SQL name"),
        ({"topic": "plant/x", "table": "t", "fields": {"v": "value"}}, "a path starts with $"),
        ({"topic": "plant/x", "table": "t", "fields": {"v": {"path": "$.a", "type": "decimal"}}}, "fields.v.type"),
        ({"topic": "plant/x", "table": "t", "key": ["nope"]}, "key: 'nope' is not a column"),
    ],
)
def test_mapping_config_errors_name_the_problem(rule: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate(BridgeConfig, {"tenants": [{"name": "a", "url": "mqtts://h"}], "mappings": [rule]}, "bridge.yaml")
    assert str(caught.value).startswith("bridge.yaml: mappings[0]")
    assert error in str(caught.value)


def test_topic_filters_match_like_mqtt() -> None:
    assert topic_matches("gw/+/data/+", "gw/a/data/b")
    assert not topic_matches("gw/+/data/+", "gw/a/data/b/c")
    assert topic_matches("plant/#", "plant/a/b")
    assert not topic_matches("+/x", "$SYS/x")


def test_the_router_decodes_by_subscription_identifier() -> None:
    subscriptions = plan([MappingRule(topic="gw/{gw}/meta/{device}", table="meta", fields={"unit": "$.unit"})])
    router = Router(subscriptions)
    meta_id = next(s.id for s in subscriptions if s.filter == "gw/+/meta/+")
    window = [
        Received("gw/gw-01/data/press-1", payload(), 1, 1, 1, (1,), 0),
        Received("gw/gw-01/meta/press-1", b'{"unit":"degC"}', 1, 2, 1, (meta_id,), 0),
        Received("gw/gw-01/data/press-1", b"oops", 1, 3, 1, (), 0),
    ]
    decoded = router.decode(window)
    assert [b.seq for b in decoded.batches] == [7]
    assert decoded.mapped["meta"][0]["unit"] == "degC"
    assert [d.reason for d in decoded.dead] == ["invalid JSON: Expecting value at byte 0"]


# ---------------------------------------------------------------- alert rules


@pytest.mark.parametrize(
    ("rule", "error"),
    [
        ({"name": "r", "tag": "t"}, "give exactly one condition"),
        ({"name": "r", "tag": "t", "above": 1, "below": 0}, "give exactly one condition"),
        ({"name": "r", "above": 1}, "above needs tag:"),
        ({"name": "r", "tag": "t", "above": 85, "clear_below": 90}, "clear_below 90 must not be above above 85"),
        (
            {"name": "r", "tag": "t", "below": 5, "clear_below": 1},
            "clear_below does not go with below (use clear_above)",
        ),
        ({"name": "r", "tag": "t", "outside": [10, 0]}, "low end 10 is above its high end 0"),
        ({"name": "r", "stale": "1m", "for": "10s"}, "stale is a duration already"),
        ({"name": "r", "tag": "t", "above": 1, "for": "soon"}, "expected a duration like 500ms, 1s or 5m"),
        ({"name": "r", "tag": "t", "above": 1, "message": "{value.__class__}"}, "unknown field {value.__class__}"),
        (
            {"name": "r", "tag": "t", "above": 1, "severity": "fatal"},
            "severity: must be 'info', 'warning' or 'critical'",
        ),
        ({"name": "r", "tag": "t", "above": 1, "notify": ["ops"]}, "notify: no webhook named 'ops' (webhooks: none)"),
    ],
)
def test_alert_rule_errors_name_the_problem(rule: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate(
            BridgeConfig, {"tenants": [{"name": "a", "url": "mqtts://h"}], "alerts": {"rules": [rule]}}, "bridge.yaml"
        )
    assert error in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1


def test_message_templates_fill_known_fields_and_survive_bad_specs() -> None:
    assert (
        render("{device} at {value:.1f} (limit {threshold})", {"device": "cnc-1", "value": 86.123, "threshold": 85})
        == "cnc-1 at 86.1 (limit 85)"
    )
    assert render("{value:.1f}", {"value": "n/a"}) == "n/a"


# ---------------------------------------------------------------- the engine


class Clock:
    """Feeds an engine readings and ticks at explicit times; collects (rule, state) changes."""

    def __init__(self, *rules: dict[str, Any]) -> None:
        self.engine = AlertEngine("acme", [AlertRule.model_validate(r) for r in rules])
        self.engine.load([], [], now_ms=0)
        self.changes: list[tuple[str, str, str]] = []

    def point(
        self,
        ts: int,
        value: Any,
        *,
        tag: str = "temp",
        device: str = "cnc-1",
        quality: str = "good",
        now: int | None = None,
    ) -> None:
        ev = self.engine.evaluation(now if now is not None else ts)
        ev.point(GW, device, tag, ts, value, quality, now if now is not None else ts)
        self._apply(ev)

    def status(self, state: str, now: int) -> None:
        ev = self.engine.evaluation(now)
        ev.status(GW, state, now)
        self._apply(ev)

    def tick(self, now: int) -> None:
        ev = self.engine.evaluation(now)
        ev.tick()
        self._apply(ev)

    def _apply(self, ev: Any) -> None:
        self.changes += [(c.device, c.rule, str(c.state)) for c in ev.changes]
        self.engine.apply(ev)

    def states(self) -> list[str]:
        return [s for _, _, s in self.changes]


def test_above_with_for_pends_then_fires_once_and_resolves_only_below_the_clear_limit() -> None:
    c = Clock({"name": "hot", "device": "cnc-*", "tag": "temp", "above": 85, "for": "30s", "clear_below": 80})
    c.point(0, 86)
    assert c.states() == ["pending"]
    c.point(10_000, 90)
    c.tick(20_000)
    assert c.states() == ["pending"]
    c.tick(30_000)
    assert c.states() == ["pending", "firing"]
    c.point(31_000, 95)
    c.point(32_000, 82)  # in the hysteresis band: still firing
    c.tick(40_000)
    assert c.states() == ["pending", "firing"]
    c.point(41_000, 79)
    assert c.states() == ["pending", "firing", "resolved"]


def test_a_pending_alert_that_clears_before_for_never_fires() -> None:
    c = Clock({"name": "hot", "tag": "temp", "above": 85, "for": "30s"})
    c.point(0, 86)
    c.point(5_000, 84)
    c.tick(60_000)
    assert c.states() == ["pending", "resolved"]


def test_readings_older_than_the_newest_do_not_move_alerts() -> None:
    c = Clock({"name": "hot", "tag": "temp", "above": 85})
    c.point(10_000, 90)
    c.point(5_000, 10)  # a backlog reading from before: stored, but not the current value
    assert c.states() == ["firing"]
    c.point(10_000, 10)  # the same reading again (redelivery)
    assert c.states() == ["firing"]


def test_rate_outside_and_equals_conditions() -> None:
    c = Clock(
        {"name": "jump", "tag": "temp", "rate_above": 2},
        {"name": "band", "tag": "pressure", "outside": [1, 5], "clear_inside": [1.5, 4.5]},
        {"name": "door", "tag": "door", "equals": True},
        {"name": "stopped", "tag": "speed", "equals": 0},
    )
    c.point(0, 10)
    c.point(1_000, 11)  # +1/s
    c.point(2_000, 15)  # +4/s
    c.point(0, 6, tag="pressure")
    c.point(1_000, 4.8, tag="pressure")  # inside the band, outside the clear band: holds
    c.point(2_000, 3, tag="pressure")
    c.point(0, False, tag="door")
    c.point(1_000, True, tag="door")
    c.point(0, 0, tag="speed")
    assert c.changes == [
        ("cnc-1", "jump", "firing"),
        ("cnc-1", "band", "firing"),
        ("cnc-1", "band", "resolved"),
        ("cnc-1", "door", "firing"),
        ("cnc-1", "stopped", "firing"),
    ]


def test_one_alert_per_device_when_the_tag_glob_matches_several_tags() -> None:
    c = Clock({"name": "hot", "tag": "zone*", "above": 85})
    c.point(0, 90, tag="zone1")
    c.point(0, 91, tag="zone2")
    c.point(1_000, 50, tag="zone1")
    assert c.states() == ["firing"]
    c.point(1_000, 50, tag="zone2")
    assert c.states() == ["firing", "resolved"]


def test_stale_fires_when_data_stops_and_resolves_when_it_returns() -> None:
    c = Clock({"name": "silent", "device": "*", "stale": "60s"})
    c.point(0, 1)
    c.tick(59_000)
    assert c.states() == []
    c.tick(61_000)
    c.tick(70_000)
    assert c.states() == ["firing"]
    c.point(71_000, 1, quality="bad")  # a failed read is not data
    assert c.states() == ["firing"]
    c.point(72_000, 2)
    assert c.states() == ["firing", "resolved"]


def test_gateway_offline_from_the_status_topic_with_for() -> None:
    c = Clock({"name": "gw-down", "offline": True, "for": "1m"})
    c.status("offline", 0)
    c.tick(61_000)
    c.status("online", 62_000)
    assert c.changes == [
        (GATEWAY_DEVICE, "gw-down", "pending"),
        (GATEWAY_DEVICE, "gw-down", "firing"),
        (GATEWAY_DEVICE, "gw-down", "resolved"),
    ]


def test_a_restarted_engine_continues_from_stored_state_without_refiring() -> None:
    rule = {"name": "hot", "tag": "temp", "above": 85, "for": "30s"}
    c = Clock(rule)
    c.point(0, 90)
    c.tick(30_000)
    stored = [i.copy() for i in c.engine.instances.values()]
    restarted = Clock(rule)
    restarted.engine.load(stored, [], now_ms=31_000)
    restarted.point(32_000, 91)
    restarted.tick(40_000)
    assert restarted.states() == []
    assert restarted.engine.instances[(GW, "cnc-1", "hot")].state is State.FIRING
    restarted.point(50_000, 10)
    assert restarted.states() == ["resolved"]


def test_an_uncommitted_evaluation_changes_nothing() -> None:
    c = Clock({"name": "hot", "tag": "temp", "above": 85})
    ev = c.engine.evaluation(0)
    ev.point(GW, "cnc-1", "temp", 0, 90, "good", 0)
    assert [str(x.state) for x in ev.changes] == ["firing"]
    assert c.engine.instances == {} and c.engine.series == {}  # the commit failed: retry from scratch
    ev = c.engine.evaluation(0)
    ev.point(GW, "cnc-1", "temp", 0, 90, "good", 0)
    assert [str(x.state) for x in ev.changes] == ["firing"]


def test_webhook_signatures_cover_timestamp_and_body() -> None:
    now = int(time.time())
    signature = sign("s3cret", now, b'{"a":1}')
    assert signature.startswith("sha256=") and len(signature) == 7 + 64
    assert verify("s3cret", str(now), b'{"a":1}', signature)
    assert not verify("s3cret", str(now), b'{"a":2}', signature)
    assert not verify("other", str(now), b'{"a":1}', signature)
    assert not verify("s3cret", str(now - 3600), b'{"a":1}', sign("s3cret", now - 3600, b'{"a":1}'))
    assert not math.isnan(0.0)


def test_a_gateway_inventing_names_is_bounded_and_resolved_alerts_are_forgotten() -> None:
    c = Clock({"name": "hot", "tag": "temp", "above": 85})
    c.engine.max_series_per_gateway = 3
    c.engine.forget_resolved_ms = 3_600_000
    for n in range(10):
        c.point(1000 + n, 90, device=f"made-up-{n}")
    assert len(c.engine.series) == 3 and c.states() == ["firing"] * 3  # the rest stored, not evaluated
    for n in range(3):
        c.point(2000 + n, 20, device=f"made-up-{n}")
    assert c.states() == ["firing"] * 3 + ["resolved"] * 3 and len(c.engine.instances) == 3
    c.tick(2000 + 3_600_000 - 10)
    assert len(c.engine.instances) == 3
    c.tick(2000 + 3_600_000 + 60_000)
    assert c.engine.instances == {}
    c.point(3_700_000, 95, device="made-up-0")  # a known series still alerts
    assert c.states()[-1] == "firing"
