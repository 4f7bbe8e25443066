"""A certificate's serial number and validity period, read with the standard library alone.

The agent checks its certificate's dates before every connection, and the
renewer schedules itself by them. Reading those three fields from the DER
does not need the ``cryptography`` package, which takes some 10 MB of a
gateway's memory once it is imported. That package is still used to
check TLS files, to renew and to provision, which happen rarely.

Only the fields the dates need are read: the certificate is a SEQUENCE
whose first element, ``tbsCertificate``, holds an optional ``[0]``
version, the serial number, the signature algorithm, the issuer, then
``validity``: two times, each UTCTime (``YYMMDDHHMMSSZ``, years 1950-2049
as RFC 5280 says) or GeneralizedTime (``YYYYMMDDHHMMSSZ``). Anything else
(not PEM, not DER as expected, a time with fractions or an offset) gives
``None``. Callers then read the file with ``cryptography``, whose errors
say what is wrong.
"""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass

_SEQUENCE, _INTEGER, _UTC_TIME, _GENERALIZED_TIME, _VERSION = 0x30, 0x02, 0x17, 0x18, 0xA0


@dataclass(frozen=True, slots=True)
class CertDates:
    """The attributes of ``cryptography.x509.Certificate`` that the agent schedules by (same names)."""

    serial_number: int
    not_valid_before_utc: dt.datetime
    not_valid_after_utc: dt.datetime


class _Unreadable(Exception):
    pass


def read_cert_dates(pem: bytes) -> CertDates | None:
    """The first certificate of a PEM file: its serial and validity, or None when this reader cannot tell."""
    try:
        text = pem.decode("ascii")
        begin = text.index("-----BEGIN CERTIFICATE-----")
        end = text.index("-----END CERTIFICATE-----", begin) + len("-----END CERTIFICATE-----")
        der = ssl.PEM_cert_to_DER_cert(text[begin:end])
        tag, body, _ = _tlv(der, 0)
        _expect(tag, _SEQUENCE)
        tag, tbs, _ = _tlv(der, body)
        _expect(tag, _SEQUENCE)
        tag, at, after = _tlv(der, tbs)
        if tag == _VERSION:
            tag, at, after = _tlv(der, after)
        _expect(tag, _INTEGER)
        serial = int.from_bytes(der[at:after], "big", signed=True)
        for _ in ("signature algorithm", "issuer"):
            tag, _, after = _tlv(der, after)
            _expect(tag, _SEQUENCE)
        tag, validity, _ = _tlv(der, after)
        _expect(tag, _SEQUENCE)
        before_tag, at, after = _tlv(der, validity)
        not_before = _time(before_tag, der[at:after])
        after_tag, at, end_at = _tlv(der, after)
        not_after = _time(after_tag, der[at:end_at])
    except (ValueError, UnicodeDecodeError, IndexError, _Unreadable):
        return None
    return CertDates(serial, not_before, not_after)


def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, where the value starts, where it ends) of the element at ``at``."""
    tag, length = der[at], der[at + 1]
    at += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4:
            raise _Unreadable
        length = int.from_bytes(der[at : at + count], "big")
        at += count
    if at + length > len(der):
        raise _Unreadable
    return tag, at, at + length


def _expect(tag: int, wanted: int) -> None:
    if tag != wanted:
        raise _Unreadable


def _time(tag: int, value: bytes) -> dt.datetime:
    text = value.decode("ascii")
    if tag == _UTC_TIME and len(text) == 13 and text.endswith("Z"):
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif not (tag == _GENERALIZED_TIME and len(text) == 15 and text.endswith("Z")):
        raise _Unreadable
    return dt.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=dt.UTC)
