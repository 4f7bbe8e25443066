"""Config loading: profiles and ranges against the same plant written out tag by tag.

    python bench/bench_config.py [--devices 10] [--registers 10000] [--repeat 3]

A plant of ``--devices`` Modbus devices of one model, ``--registers``
holding registers each, written two ways:

1. short: one profile with one range (``addresses: 0-9999``), one line per device;
2. hand-written (the raw baseline, measured in the same run): every tag on
   its own line, what a config looks like without ranges.

Both are loaded the way ``agent run`` and ``agent check-config`` load them
(YAML parse, expansion, validation; best of ``--repeat``) and must give the
same devices; printed: seconds, file size, and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml

from agent.config import load_config


def best(path: Path, repeat: int) -> tuple[float, object]:
    times, config = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        config = load_config(path)
        times.append(time.perf_counter() - started)
    return min(times), config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--registers", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    short = {
        "profiles": {
            "model": {
                "protocol": "modbus-tcp",
                "host": "127.0.0.1",
                "tags": [{"name": "r{address}", "addresses": f"0-{args.registers - 1}"}],
            }
        },
        "devices": [{"name": f"d{i}", "profile": "model", "unit": i + 1} for i in range(args.devices)],
    }
    long = {
        "devices": [
            {
                "name": f"d{i}",
                "protocol": "modbus-tcp",
                "host": "127.0.0.1",
                "unit": i + 1,
                "tags": [{"name": f"r{a}", "address": a} for a in range(args.registers)],
            }
            for i in range(args.devices)
        ]
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, doc in (("short", short), ("hand-written", long)):
            paths[name] = Path(tmp) / f"{name}.yaml"
            paths[name].write_text(yaml.safe_dump(doc, sort_keys=False))
        s_time, s_config = best(paths["short"], args.repeat)
        l_time, l_config = best(paths["hand-written"], args.repeat)
        same = [d.model_dump(exclude={"profile"}) for d in s_config.devices] == [  # type: ignore[attr-defined]  # AgentConfig
            d.model_dump(exclude={"profile"})
            for d in l_config.devices  # type: ignore[attr-defined]  # AgentConfig
        ]
        tags = args.devices * args.registers
        print(f"{args.devices} devices x {args.registers} registers = {tags} tags; same devices: {same}")
        for name, seconds in (("short (profile + range)", s_time), ("hand-written (baseline)", l_time)):
            size = paths[name.split()[0]].stat().st_size
            print(f"  {name:26} {seconds:7.2f} s  {size / 1024:9.1f} KiB  {tags / seconds:10.0f} tags/s")
        print(f"  ratio: the short file loads {l_time / s_time:.1f}x faster and is "
              f"{paths['hand-written'].stat().st_size / paths['short'].stat().st_size:.0f}x smaller")  # fmt: skip
        if not same:
            sys.exit("the two files do not give the same devices")


if __name__ == "__main__":
    main()
