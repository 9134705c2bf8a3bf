"""The resident service: `berth-update daemon` (its loop, the worker process each update runs in,
sd_notify, wall notices before a reboot) and `berth-update health`, the check that decides
whether a new version is blessed.

May import the agent facade and everything below it; only the CLI imports this package.
"""
