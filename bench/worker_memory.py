"""The update worker's peak memory during one apply, measured the way the daemon runs it.

    .venv/bin/python -m bench.worker_memory SPEC      (bench_delta runs it; see peak_memory there)

SPEC is a pickle of the (Machine, UpdateConfig) to apply on. This process imports what the
daemon imports before it forks a worker (updater.service.worker, the machine's dataclasses);
the apply then runs in `run_in_child`, a fork, as berth-update.service's worker does, and
imports the agent there (requests, python-tuf, cryptography), as that worker does. The fork
resets its peak resident size (Linux: clear_refs 5) first, so the figure is the worker's own
peak, the pages it shares with the process it was forked from included, as `ps` would count
them. Prints one JSON line: the peak, the resident size at the fork, the bytes the apply fetched
and reused.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

from updater.config import UpdateConfig
from updater.service.worker import run_in_child
from updater.update.machine import Machine


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _apply(machine: Machine, config: UpdateConfig) -> dict[str, int]:
    Path("/proc/self/clear_refs").write_text("5")
    at_fork = _status_kib("VmRSS") * 1024
    from updater.agent import Agent  # in the worker, as the daemon's worker imports it

    applied = Agent(machine, config).apply()
    transfer = applied.transfer
    return {
        "peak": _status_kib("VmHWM") * 1024,
        "at_fork": at_fork,
        "fetched": 0 if transfer is None else transfer.fetched,
        "reused": 0 if transfer is None else transfer.reused,
    }


def main() -> int:
    machine, config = pickle.loads(Path(sys.argv[1]).read_bytes())
    print(json.dumps(run_in_child(lambda: _apply(machine, config))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
