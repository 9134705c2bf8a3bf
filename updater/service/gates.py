"""The reboot gate a configuration asks for (`strategy` in update.toml).

Here rather than in `updater.reboot`: the gates and lock clients know nothing of update.toml, and
`updater.config` imports `updater.reboot` for the window and group rules, so the mapping from a
configuration to a gate sits above both.
"""

from __future__ import annotations

from pathlib import Path

from updater.config import Strategy, UpdateConfig
from updater.reboot.gate import Immediate, LockGate, Off, RebootGate, WindowGate, holder_id
from updater.reboot.windows import Schedule


def gate_for(config: UpdateConfig, machine_id: Path) -> RebootGate:
    """The gate for `config.strategy`; load_config has checked the strategy's own table."""
    strategy = config.strategy
    if strategy is Strategy.IMMEDIATE:
        return Immediate()
    if strategy is Strategy.OFF:
        return Off()
    if strategy is Strategy.WINDOW:
        return WindowGate(Schedule(config.windows))
    # They import requests: only a lock strategy loads them (see worker.py).
    from updater.reboot.etcdlock import EtcdStore, TLSFiles
    from updater.reboot.fleetlock import FleetLockClient
    from updater.reboot.semaphore import SemaphoreClient

    holder = holder_id(machine_id)
    if strategy is Strategy.FLEET_LOCK:
        return LockGate(
            fleetlock=FleetLockClient(config.fleet_lock_url, config.fleet_lock_group, holder),
            holder=holder,
        )
    tls = TLSFiles(config.etcd_ca_file, config.etcd_cert_file, config.etcd_key_file)
    store = EtcdStore(config.etcd_endpoints, tls)
    return LockGate(
        semaphore=SemaphoreClient(store, config.etcd_group, config.etcd_slots), holder=holder
    )
