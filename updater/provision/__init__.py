"""First-boot provisioning: one config (Ignition v3 or cloud-config), applied once per machine.

- `plan`: what a config asks for, whichever format it came in; the errors every stage raises.
- `ignition`, `cloudconfig`: parse and validate a config into a `Plan` (fetching remote contents).
- `sources`: which platform this is and where its config comes from (fw_cfg, drives, metadata).
- `apply`: stage everything, then commit it; the once-per-machine stamp on STATE.
- `__main__`: the `berth-provision` service that ties them together before sshd starts.

Stands beside the update packages: it may import only the shared modules (`errors`, `files`,
`run`) and its own. A new config source is a `Source` in `sources.py`.
"""
