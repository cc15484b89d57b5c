"""Run one engine operation and die at a named crash point.

Usage: ``python crash_child.py <pool-root> <crash-point> <operation-json>``

The pool is opened with a crash hook that ends the process with
``os._exit(137)`` (no cleanup, no flushing, locks dropped by the kernel:
as close to a power cut as a process can get) the moment the engine
reaches the named point.  If the operation finishes without reaching it
the child prints the points it did pass and exits 0, which the test
reports as a failure.

Operations (JSON): ``{"op": "create_volume", "name": ..., "required_bytes": ...,
"source": ["snapshot" | "volume", id] | null}``, ``{"op": "create_snapshot",
"name": ..., "volume": ...}``, ``{"op": "expand_volume", "volume": ...,
"required_bytes": ...}``, ``{"op": "maintain"}``; any of them may carry
``"config"`` (keyword arguments of PoolConfig).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.model import SnapshotSource, VolumeSource  # noqa: E402
from engine.pool import Pool, PoolConfig  # noqa: E402
from engine.reclaim import Maintainer  # noqa: E402

CRASH_EXIT = 137


def run(pool: Pool, spec: dict[str, Any]) -> None:
    op = spec["op"]
    if op == "create_volume":
        source = None
        if spec.get("source"):
            kind, ident = spec["source"]
            source = SnapshotSource(ident) if kind == "snapshot" else VolumeSource(ident)
        pool.create_volume(spec["name"], required_bytes=spec.get("required_bytes", 0),
                           source=source)
    elif op == "create_snapshot":
        pool.create_snapshot(spec["name"], spec["volume"])
    elif op == "expand_volume":
        pool.expand_volume(spec["volume"], spec["required_bytes"])
    elif op == "maintain":
        Maintainer(pool).run_once()
    else:
        raise SystemExit(f"unknown operation {op!r}")


def main() -> int:
    root, point, spec = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    passed: list[str] = []

    def hook(name: str) -> None:
        passed.append(name)
        if name == point:
            os._exit(CRASH_EXIT)

    pool = Pool.open(root, config=PoolConfig(**spec.get("config", {})), crash_hook=hook)
    run(pool, spec)
    pool.close()
    print(json.dumps({"not_reached": point, "passed": passed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
