"""pymodbus' own log lines, turned down where we call it.

pymodbus logs a failed send or a dropped connection as an error with a hex
dump of the last frames::

    Cancel send, because not connected! >>>>> send: 0x0 0x1 0x0 0x0 0x0 0x6 …

The driver already reports each of these faults as a ``bad`` point with a
reason in a technician's words (``connection refused``, ``timeout``), so the
library's lines are debug detail: shown, without the dump, only with
``--log-level debug``. Installed when the Modbus driver is imported.
"""

from __future__ import annotations

import logging

PYMODBUS_LOGGER = "pymodbus.logging"  # pymodbus.logging.Log writes every line through it


class LibraryNoise(logging.Filter):
    """Every pymodbus record becomes a DEBUG record without its frame dump, dropped unless debugging."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            record.msg = record.getMessage().split(" >>>>>")[0].split("\n>>>>>")[0]
            record.args = None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def install() -> None:
    """Attach the filter once (idempotent)."""
    logger = logging.getLogger(PYMODBUS_LOGGER)
    if not any(isinstance(f, LibraryNoise) for f in logger.filters):
        logger.addFilter(LibraryNoise())
