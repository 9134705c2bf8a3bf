"""One update's life on a machine: choosing a release (TUF refresh, channel, waves), installing it
into the inactive slot (fetching the payload while hashing), judging each boot (bless, roll back,
prune), and the agent's state file that remembers it all.

`choose` (refresh, channel, selection, the machine's wave seed), `install` (apply and its safety
argument, verify_pending), `judge` (after-boot, reject a trial, roll back, prune) and `status`
(reads only) do the work, on a `context.Context` (the machine, its configuration, the clock,
the state file); `trust` is the TUF client, `fetch` the checked download, `state` the state
file, `machine` where a machine's parts are.

May import `config`, `disk`, `release` and the shared modules. `updater.agent` is the facade the
CLI and the daemon use; they never reach into these modules for work, only for small types
(`Machine`, `FetchOptions`, `write_reboot_required`, the state file's reader). Importing this
package is cheap: its modules load requests and python-tuf only when imported themselves (see
service/worker.py).
"""
