"""OPC UA values as points and back: pure conversions, no server."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from asyncua import ua

from drivers.config import Deadband
from drivers.opcua.connection import describe
from drivers.opcua.monitor import deadband_filter
from drivers.opcua.values import coerce_for_write, float32, json_value, point_from_datavalue, quality_of
from drivers.points import Point, Quality

T0 = dt.datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=dt.UTC)
T0_MS = 1714979289123


def datavalue(value: object, variant_type: ua.VariantType, **kw: Any) -> ua.DataValue:
    return ua.DataValue(ua.Variant(value, variant_type), **kw)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (ua.StatusCodes.Good, (Quality.GOOD, None)),
        (ua.StatusCodes.GoodClamped, (Quality.GOOD, None)),
        (ua.StatusCodes.UncertainSensorNotAccurate, (Quality.UNCERTAIN, "UncertainSensorNotAccurate")),
        (ua.StatusCodes.BadCommunicationError, (Quality.BAD, "BadCommunicationError")),
    ],
)
def test_status_code_quality(code: int, expected: tuple[Quality, str | None]) -> None:
    assert quality_of(ua.StatusCode(ua.UInt32(code))) == expected


def test_source_timestamp_first_then_server_then_default() -> None:
    later = T0 + dt.timedelta(seconds=1)
    both = datavalue(1.5, ua.VariantType.Double, SourceTimestamp=T0, ServerTimestamp=later)
    server_only = datavalue(1.5, ua.VariantType.Double, ServerTimestamp=later)
    neither = datavalue(1.5, ua.VariantType.Double)
    assert point_from_datavalue("d", "t", both, default_ms=5).ts == T0_MS
    assert point_from_datavalue("d", "t", server_only, default_ms=5).ts == T0_MS + 1000
    assert point_from_datavalue("d", "t", neither, default_ms=5).ts == 5


def test_bad_status_drops_the_value_uncertain_keeps_it() -> None:
    bad = datavalue(
        3.0,
        ua.VariantType.Double,
        StatusCode=ua.StatusCode(ua.UInt32(ua.StatusCodes.BadOutOfService)),
        SourceTimestamp=T0,
    )
    uncertain = datavalue(
        3.0,
        ua.VariantType.Double,
        StatusCode=ua.StatusCode(ua.UInt32(ua.StatusCodes.UncertainInitialValue)),
        SourceTimestamp=T0,
    )
    assert point_from_datavalue("d", "t", bad) == Point("d", "t", T0_MS, None, Quality.BAD, "BadOutOfService")
    assert point_from_datavalue("d", "t", uncertain) == Point(
        "d", "t", T0_MS, 3.0, Quality.UNCERTAIN, "UncertainInitialValue"
    )


def test_non_finite_float_is_a_bad_point() -> None:
    point = point_from_datavalue("d", "t", datavalue(float("nan"), ua.VariantType.Double, SourceTimestamp=T0))
    assert (point.quality, point.value, point.error) == (Quality.BAD, None, "non-finite value nan")


@pytest.mark.parametrize(
    ("value", "variant_type", "expected"),
    [
        (True, ua.VariantType.Boolean, True),
        (-7, ua.VariantType.Int16, -7),
        (ua.ServerState.Running, ua.VariantType.Int32, 0),
        (71.19999694824219, ua.VariantType.Float, 71.2),
        (0.1, ua.VariantType.Double, 0.1),
        ("Bread-200", ua.VariantType.String, "Bread-200"),
        (T0, ua.VariantType.DateTime, "2024-05-06T07:08:09.123000+00:00"),
        (b"\x01\xab", ua.VariantType.ByteString, "01ab"),
        (ua.LocalizedText("Oven", "en"), ua.VariantType.LocalizedText, "Oven"),
        (ua.NodeId(ua.String("Oven.State"), ua.Int16(2)), ua.VariantType.NodeId, "ns=2;s=Oven.State"),
        ([1.5, 2.5], ua.VariantType.Double, "[1.5, 2.5]"),
        (None, ua.VariantType.Null, None),
    ],
)
def test_json_value(value: object, variant_type: ua.VariantType, expected: object) -> None:
    converted = json_value(value, variant_type)
    assert converted == expected
    assert type(converted) is type(expected)


def test_float32_picks_the_shortest_decimal_that_round_trips() -> None:
    assert float32(42.70000076293945) == 42.7
    assert float32(0.30000001192092896) == 0.3
    assert float32(16777216.0) == 16777216.0
    assert float32(3.4028234663852886e38) == 3.4028235e38


@pytest.mark.parametrize(
    ("value", "variant_type", "expected"),
    [
        (185, ua.VariantType.Double, 185.0),
        ("172.5", ua.VariantType.Float, 172.5),
        ("true", ua.VariantType.Boolean, True),
        (0, ua.VariantType.Boolean, False),
        (4_000_000_000, ua.VariantType.UInt32, 4_000_000_000),
        (12.0, ua.VariantType.Int16, 12),
        (" 42 ", ua.VariantType.Byte, 42),
        (7, ua.VariantType.String, "7"),
    ],
)
def test_write_values_fit_the_node_type(value: object, variant_type: ua.VariantType, expected: object) -> None:
    converted = coerce_for_write(value, variant_type)
    assert converted == expected
    assert type(converted) is type(expected)


@pytest.mark.parametrize(
    ("value", "variant_type", "message"),
    [
        (256, ua.VariantType.Byte, "256 is out of range for Byte (0..255)"),
        (-1, ua.VariantType.UInt32, "-1 is out of range for UInt32 (0..4294967295)"),
        (1.5, ua.VariantType.Int32, "expected a whole number, got 1.5"),
        (True, ua.VariantType.Double, "expected a number, got True"),
        ("warm", ua.VariantType.Double, "expected a number, got 'warm'"),
        (1e39, ua.VariantType.Float, "1e+39 is out of range for Float"),
        (2, ua.VariantType.Boolean, "expected true or false, got 2"),
        (None, ua.VariantType.String, "expected text, got None"),
        (T0, ua.VariantType.DateTime, "writing DateTime values is not supported"),
    ],
)
def test_write_values_that_do_not_fit(value: object, variant_type: ua.VariantType, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        coerce_for_write(value, variant_type)
    assert str(caught.value) == message


def test_deadband_filters() -> None:
    absolute = deadband_filter(Deadband(0.5))
    percent = deadband_filter(Deadband(2.0, percent=True))
    assert absolute is not None and percent is not None
    assert (absolute.DeadbandType, absolute.DeadbandValue, absolute.Trigger) == (
        ua.DeadbandType.Absolute,
        0.5,
        ua.DataChangeTrigger.StatusValue,
    )
    assert (percent.DeadbandType, percent.DeadbandValue) == (ua.DeadbandType.Percent, 2.0)
    assert deadband_filter(None) is None


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (TimeoutError(), "timeout"),
        (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
        (ConnectionResetError(104, "Connection reset by peer"), "connection lost"),
        (OSError(113, "No route to host"), "no route to host"),
        (ua.UaStatusCodeError(ua.StatusCodes.BadUserAccessDenied), "BadUserAccessDenied"),
    ],
)
def test_failures_become_short_reasons(exc: BaseException, reason: str) -> None:
    assert describe(exc) == reason
