"""The update agent's exceptions: one root, a shallow tree, a message that says what and why.

The library raises and never exits; only the command-line front end turns these into exit codes.
The split that matters to a caller is between `DownloadError` (the transfer failed: a later attempt
may succeed, and the daemon backs off and retries) and `VerificationError` (what arrived is not what
the signed metadata promised: the data written so far is garbage and must not be trusted).
"""

from __future__ import annotations


class UpdateError(Exception):
    """Root of everything the update agent refuses or fails at."""


class DownloadError(UpdateError):
    """An HTTP transfer failed: bad status, connection reset, timeout, server misbehaving.

    `url` and `status` (None when no HTTP status was received) let the caller report and decide.
    """

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class SlowRetrievalError(DownloadError):
    """The server sent data slower than the configured minimum rate (slow-retrieval attack)."""


class VerificationError(UpdateError):
    """Data does not match what trusted metadata says: hash, length or verity root hash."""


class LengthMismatchError(VerificationError):
    """A server sent more (endless data) or less than the trusted length of a target."""


class StorageError(UpdateError):
    """Writing or reading back local storage (a slot, the ESP, a state file) failed."""


class SlotError(UpdateError):
    """The A/B slots cannot be read or changed as asked: wrong layout, no space, wrong state."""


class BootEntryError(UpdateError):
    """Boot loader entries on the ESP cannot be read or changed as asked."""


class RefusedError(UpdateError):
    """The agent will not do what was asked: nothing to install, a downgrade without consent, a
    rollback with nothing to go back to. Nothing was changed."""


class ReleaseMismatchError(VerificationError):
    """A release's signed parts disagree (channel entry, release manifest, TUF targets) or the
    release is for another image or architecture than this machine runs."""


class CommandError(UpdateError):
    """An external command did not succeed: it exited with a non-zero status, or could not start.

    `argv` is the command, `status` its exit status (None when it never exited by itself), and
    `stdout` / `stderr` what it wrote (with combined output, everything is in `stdout`), so that a
    caller can word its own report. The message already names the command and the tail of its
    error output.
    """

    def __init__(
        self,
        message: str,
        *,
        argv: tuple[str, ...],
        status: int | None = None,
        stdout: bytes = b"",
        stderr: bytes = b"",
    ) -> None:
        super().__init__(message)
        self.argv = argv
        self.status = status
        self.stdout = stdout
        self.stderr = stderr


class CommandTimeout(CommandError):
    """A command did not finish in time; it and every process it started were killed.

    `timeout` is the limit in seconds; `stdout` / `stderr` hold what it wrote until then.
    """

    def __init__(
        self,
        message: str,
        *,
        argv: tuple[str, ...],
        timeout: float,
        stdout: bytes = b"",
        stderr: bytes = b"",
    ) -> None:
        super().__init__(message, argv=argv, stdout=stdout, stderr=stderr)
        self.timeout = timeout


class ToolMissing(CommandError):
    """The program to run is not installed: not in the search path, or its path does not exist."""
