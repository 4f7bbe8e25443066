"""The agent's config as ``agent run`` holds it: plain attributes, no pydantic (``factory_edge/frozen.py``).

``agent/config.py`` validates a file with models that inherit from these
classes; ``agent/configproc.py`` validates in a short-lived process and hands
the running agent these plain copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from drivers.configtypes import Device
from factory_edge.frozen import Frozen

DEFAULT_STATE_DIR = "/var/lib/factory-edge/agent"


class MqttConfig(Frozen):
    if TYPE_CHECKING:
        url: str | None
        ca_file: str | None
        cert_file: str | None
        key_file: str | None
        username: str | None
        password: str | None
        connect_host: str | None
        keepalive: float
        connect_timeout: float
        retry_initial: float
        retry_max: float


class BufferConfig(Frozen):
    if TYPE_CHECKING:
        max_bytes: int
        max_age: float | None
        fsync: bool
        confirm: Literal["storage", "broker"]
        confirm_timeout: float
        replay: float
        queue_points: int
        min_free: int


class PublishConfig(Frozen):
    if TYPE_CHECKING:
        max_points: int
        max_bytes: int
        inflight: int


class SparkplugConfig(Frozen):
    if TYPE_CHECKING:
        group_id: str | None
        edge_node_id: str | None
        primary_host: str | None
        data_qos: Literal[0, 1]


class RemoteConfig(Frozen):
    if TYPE_CHECKING:
        enabled: bool
        deadline: float
        max_failed_share: float


class AgentConfig(Frozen):
    if TYPE_CHECKING:
        gateway: str | None
        state_dir: str
        mqtt: MqttConfig | None
        buffer: BufferConfig
        publish: PublishConfig
        metrics_port: int | None
        sparkplug: SparkplugConfig | None
        remote_config: RemoteConfig
        profiles: dict[str, dict[str, Any]]
        devices: Sequence[Device]

    def device(self, name: str) -> Any:
        for device in self.devices:
            if device.name == name:
                return device
        raise KeyError(name)
