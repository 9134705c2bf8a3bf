"""One update's life on a machine: choosing a release (TUF refresh, channel, waves), installing it
into the inactive slot (fetching the payload while hashing), judging each boot (bless, roll back,
prune), and the agent's state file that remembers it all.

May import `config`, `disk`, `release` and the shared modules. `updater.agent` is the facade the
CLI and the daemon use; they never reach into these modules for work, only for small types
(`Machine`, `FetchOptions`, the state file's reader). Importing this package is cheap: its
modules load requests and python-tuf only when imported themselves (see service/worker.py).
"""
