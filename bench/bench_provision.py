"""``agent provision`` end to end: key to first acknowledged publish, against a raw mosquitto_pub.

    python bench/bench_provision.py [--runs 10]

Sets up a real deployment on loopback (two tenants, one Mosquitto each,
HAProxy routing by SNI, ``provisioning serve`` over HTTPS) and times, in
the same run:

- ``agent provision`` as an installer runs it: process start to exit, which
  covers key generation, the HTTPS request, signing, writing the identity,
  connecting through the proxy and a QoS 1 publish acknowledged;
- the part of that inside the command (the figure it prints itself);
- ``mosquitto_pub`` with an already provisioned identity through the same
  proxy (TLS handshake, CONNECT, QoS 1 publish): the floor for the broker part.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.provisioning_fixtures import Deployment


def summary(label: str, values: list[float]) -> str:
    values = sorted(values)
    p90 = values[min(len(values) - 1, round(0.9 * (len(values) - 1)))]
    return (
        f"{label:<44} median {statistics.median(values) * 1000:7.0f} ms   p90 {p90 * 1000:7.0f} ms   "
        f"max {values[-1] * 1000:7.0f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="provisionings to time (default 10)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fe-bench-") as tmp:
        site = Deployment(Path(tmp)).start()
        try:
            wall, inside, raw = [], [], []
            for i in range(args.runs):
                tenant = ("acme", "globex")[i % 2]
                key = site.key(tenant, "--uses", "1")
                state = Path(tmp) / f"gw-{i}"
                started = time.monotonic()
                result = site.agent_provision("--key", key, "--name", f"gw-{i}", "--state-dir", str(state))
                wall.append(time.monotonic() - started)
                if result.returncode != 0:
                    print(result.stderr, file=sys.stderr)
                    return 1
                took = re.search(r"\(([\d.]+) s\)", result.stdout.splitlines()[0])
                assert took is not None, result.stdout
                inside.append(float(took.group(1)))
                started = time.monotonic()
                pub = site.pub(site.conn(state), f"gw/gw-{i}/events", "raw")
                raw.append(time.monotonic() - started)
                if pub.returncode != 0:
                    print(pub.stderr, file=sys.stderr)
                    return 1
        finally:
            site.stop()
    print(f"agent provision, {args.runs} gateways over 2 tenants (HTTPS API, HAProxy by SNI, Mosquitto, QoS 1):")
    print(summary("agent provision (process start to exit)", wall))
    print(summary("  of which inside the command", inside))
    print(summary("mosquitto_pub, same proxy and broker (floor)", raw))
    print("target: under 3 s from key to first publish")
    return 0


if __name__ == "__main__":
    sys.exit(main())
