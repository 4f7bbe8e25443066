"""Zero-loss scenarios: a ground-truth machine, the real agent and bridge processes, and the exactly-once check.

The machine (``tests/groundtruth.py``) writes down every reading it serves;
after a scenario the tenant's store must hold each of them exactly once,
except readings the agent had taken but not yet buffered when it was
killed (a ``kill -9`` can only lose what never reached the disk: the check
allows those only within a moment before each kill).
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.agentproc import AgentProcess
from tests.bridge_fixtures import StoreView, wait_until
from tests.helpers import ROOT, free_port
from tests.infra import Mosquitto, TenantPki

GW = "gw-01"
KILL_WINDOW_S = 1.5  # readings served this long before an agent kill -9 may not have reached its buffer


@dataclass(frozen=True)
class Served:
    unit: int
    value: int | None
    bulk: int
    at_ms: int


class Plant:
    """The ground-truth machine in a process of its own (``tests/groundtruth.py``)."""

    def __init__(self, workdir: Path, *, units: tuple[int, ...] = (1,), bulk: int = 0, delay_ms: int = 0) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = workdir / "served.log"
        self.units = units
        self.bulk = bulk
        self.delay_ms = delay_ms
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> Plant:
        with open(self.workdir / "plant.err", "ab") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.groundtruth",
                    "--port",
                    str(self.port),
                    "--log",
                    str(self.log),
                    "--units",
                    *map(str, self.units),
                    "--bulk",
                    str(self.bulk),
                    "--delay-ms",
                    str(self.delay_ms),
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "serving":
            raise AssertionError(f"ground-truth machine did not start:\n{(self.workdir / 'plant.err').read_text()}")
        return self

    def freeze(self) -> None:
        """From now on every read fails: nothing more is served that a stopping agent could lose."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def served(self) -> list[Served]:
        out = []
        for line in self.log.read_text().splitlines():
            unit, value, bulk, at = line.split()
            out.append(Served(int(unit), None if value == "-" else int(value), int(bulk), int(at)))
        return out

    def points_served(self) -> int:
        """Readings served, as points: one per counter value, one per bulk register."""
        return sum((s.value is not None) + s.bulk for s in self.served())

    def devices(self, *, poll: str = "50ms", timeout: str = "5s") -> list[dict[str, Any]]:
        """The agent's config for the machine: device ``m<unit>``, tag ``served`` (the counter), ``b<i>`` (bulk)."""
        return [
            {
                "name": f"m{unit}",
                "protocol": "modbus-tcp",
                "host": "127.0.0.1",
                "port": self.port,
                "unit": unit,
                "poll": poll,
                "timeout": timeout,
                "tags": [
                    {"name": "served", "address": 0, "type": "uint64"},
                    *({"name": f"b{i}", "address": 4 + i} for i in range(self.bulk)),
                ],
            }
            for unit in self.units
        ]

    def __enter__(self) -> Plant:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def agent_config(pki: TenantPki, port: int, plant: Plant, **extra: Any) -> dict[str, Any]:
    """An agent of gateway ``gw-01`` dialling 127.0.0.1:``port`` (broker or proxy) for the tenant's broker."""
    cert, key = pki.client(GW)
    config: dict[str, Any] = {
        "gateway": GW,
        "mqtt": {
            "url": f"mqtts://{pki.host}:{port}",
            "connect_host": "127.0.0.1",
            "ca_file": str(pki.ca_file),
            "cert_file": str(cert),
            "key_file": str(key),
        },
        "buffer": {"confirm_timeout": "3s"},
        "devices": plant.devices(),
    }
    for key_, value in extra.items():
        config[key_] = {**config[key_], **value} if isinstance(value, dict) and key_ in config else value
    return config


def stored_counters(view: StoreView, tenant: str) -> dict[int, list[int]]:
    """Per unit, every ``served`` value the store holds (one entry per stored row)."""
    rows = view.rows(tenant, "SELECT device, value FROM {points} WHERE tag = 'served' AND quality = 'good'")
    out: dict[int, list[int]] = collections.defaultdict(list)
    for device, value in rows:
        out[int(device[1:])].append(int(value))
    return out


def drained(agent: AgentProcess) -> bool:
    """Nothing left in the agent's buffer: every batch confirmed by the store."""
    buf = agent.status().get("buffer", {})
    return bool(buf) and buf.get("batches", 1) == 0 and buf.get("unconfirmed_batches", 1) == 0


def wait_drained(agent: AgentProcess, timeout_s: float = 60.0) -> None:
    wait_until(
        lambda: drained(agent),
        timeout_s=timeout_s,
        interval_s=0.3,
        what=f"the agent's buffer to drain (last status: {agent.status().get('buffer')})",
    )


def finish(plant: Plant, agent: AgentProcess, *, timeout_s: float = 60.0) -> None:
    """Freeze the truth, let the agent deliver everything, stop it cleanly."""
    plant.freeze()
    time.sleep(0.5)
    wait_drained(agent, timeout_s)
    assert agent.stop() == 0


def check_exactly_once(plant: Plant, view: StoreView, tenant: str, *, kills: Sequence[float] = ()) -> dict[str, int]:
    """Every reading served is stored exactly once (but those in the moment before an agent kill -9)."""
    served = [s for s in plant.served() if s.value is not None]
    stored = stored_counters(view, tenant)
    report = {"served": len(served), "stored": sum(len(v) for v in stored.values()), "lost_at_kills": 0}
    for unit in plant.units:
        counts = collections.Counter(stored.get(unit, []))
        duplicates = sorted(v for v, c in counts.items() if c > 1)
        assert not duplicates, f"unit {unit}: values stored more than once: {duplicates[:20]}"
        truth = {s.value: s.at_ms for s in served if s.unit == unit}
        invented = sorted(set(counts) - set(truth))
        assert not invented, f"unit {unit}: values stored that were never served: {invented[:20]}"
        missing = sorted(set(truth) - set(counts), key=str)
        unexplained = [
            v for v in missing if not any(k * 1000 - KILL_WINDOW_S * 1000 <= truth[v] <= k * 1000 + 200 for k in kills)
        ]
        assert not unexplained, (
            f"unit {unit}: {len(unexplained)} of {len(truth)} served readings never stored: {unexplained[:20]}"
        )
        report["lost_at_kills"] += len(missing)
    return report


def restart_broker_hard(broker: Mosquitto) -> None:
    """kill -9 (what it acknowledged since its last autosave is gone), then start it on the same files."""
    broker.kill()
    broker.start()
