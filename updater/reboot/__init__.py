"""When a machine may reboot: the reboot gate per strategy, maintenance windows, the FleetLock
client, airlock's etcd semaphore, and the FleetLock server `berth-lockd` built on it.

May import `release` and the shared modules. Nothing here reads update.toml: the mapping from a
configuration to a gate is `updater.service.gates`. A new reboot strategy is a gate in `gate.py`
(and its client module here), a name in `updater.config.Strategy`, and a case in
`updater.service.gates.gate_for`.
"""
