"""The one exception tree of factory-edge.

Third-party errors (pymodbus, asyncua, paho, psycopg, cryptography) are
converted into these at the one place each library is called, with
``raise ... from exc``, so the command-line tools can catch
``FactoryEdgeError`` alone and print one line::

    FactoryEdgeError
    ├── ConfigError          bad config file, field or value (exit code 2)
    ├── DriverError          a machine could not be read or written
    │   └── WriteRefused     the tag is not writable, or the value does not fit
    ├── BufferError          the agent's store-and-forward buffer
    ├── PublishError         MQTT connection or publish
    ├── ProvisioningError    tenants, keys, certificates
    ├── StorageError         the bridge's storage
    └── InvalidName          a name outside its grammar (factory_edge.names)
"""

from __future__ import annotations


class FactoryEdgeError(Exception):
    """Base of every error factory-edge raises on purpose."""

    exit_code = 1


class ConfigError(FactoryEdgeError):
    """A configuration file or value is wrong; the message names where."""

    exit_code = 2


class DriverError(FactoryEdgeError):
    """A machine could not be read or written."""


class WriteRefused(DriverError):
    """A write was refused before reaching the machine (not writable, bad value)."""


class BufferError(FactoryEdgeError):
    """The agent's buffer could not store or hand out points."""


class PublishError(FactoryEdgeError):
    """MQTT connection or publish failed."""


class ProvisioningError(FactoryEdgeError):
    """Tenants, keys or certificates could not be handled."""


class StorageError(FactoryEdgeError):
    """The bridge's storage failed."""
