"""Berth's update agent, daemon and provisioner: what runs on every machine.

The map of this package is docs/architecture.md.

Packages from the bottom up; each may import only those below it and the shared modules
(`errors`, `files`, `run`):
`release` (the format shared with the builder) → `disk` (GPT, slots, verity, boot entries) →
`reboot` (gates and locks) → `config` (update.toml) → `update` (one update's life: choose,
install, judge) → `agent` (the facade) → `service` (daemon, health check) → `cli`.
`provision` stands beside them and uses only the shared modules.
"""
