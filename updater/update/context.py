"""What every part of one update's life works with: the machine and its configuration, the clock,
the download limits and the state file; and what the machine runs right now (its image, version
and root hash, its boot, its two slots).

Light (no requests, no python-tuf), like machine.py and state.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from updater.config import UpdateConfig
from updater.disk import slots
from updater.errors import SlotError, UpdateError
from updater.files import read_utf8
from updater.release.osrelease import parse_os_release
from updater.release.version import Version
from updater.update.lock import AgentLock
from updater.update.machine import FetchOptions, Machine
from updater.update.state import State, load_state, save_state, state_path


@dataclass(frozen=True)
class Booted:
    """The running system: what /etc/os-release and the kernel command line say."""

    image: str
    version: Version
    roothash: str


def read_os_release(path: Path) -> dict[str, str]:
    """KEY=value pairs of an os-release file, with its quoting removed (updater.release.osrelease);
    UpdateError naming the file when it cannot be read or is not UTF-8."""
    return parse_os_release(read_utf8(path, UpdateError))


@dataclass(frozen=True)
class Context:
    """One agent's view of its machine; the facade (updater.agent) builds it once."""

    machine: Machine
    config: UpdateConfig
    now: Callable[[], datetime]
    fetch_options: FetchOptions
    lock: AgentLock | None = None  # held for the facade call this context serves

    def step(self, phase: str, *, action: str | None = None) -> None:
        """Tell a second actor what this one does now ("writing slot B"; see lock.py)."""
        if self.lock is not None:
            self.lock.step(phase, action=action)

    @property
    def state_path(self) -> Path:
        return state_path(self.machine.var)

    def load_state(self) -> State:
        """The state file, or a fresh state (a corrupt file is moved aside)."""
        return load_state(self.state_path, self.now())

    def read_state(self) -> State:
        """The state file for a reader that never writes: a corrupt file is left where it is."""
        return load_state(self.state_path, set_aside=False)

    def save_state(self, state: State) -> None:
        save_state(self.state_path, state)

    def booted(self) -> Booted:
        fields = read_os_release(self.machine.os_release)
        image, text = fields.get("IMAGE_ID"), fields.get("IMAGE_VERSION")
        if not image or not text:
            raise UpdateError(
                f"{self.machine.os_release} has no IMAGE_ID or IMAGE_VERSION: not a Berth image"
            )
        try:
            version = Version.parse(text)
        except ValueError as e:
            raise UpdateError(f"{self.machine.os_release}: IMAGE_VERSION: {e}") from None
        return Booted(image, version, slots.booted_roothash(self.machine.cmdline))

    def boot_id(self) -> str:
        """This boot's id ("" when the kernel does not say): a pending record made in this very
        boot cannot have been tried yet."""
        try:
            return self.machine.boot_id.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return ""

    def slot_pair(self) -> tuple[slots.Slot, slots.Slot]:
        """Both slots as the GPT says now."""
        try:
            with self.machine.disk.open("rb") as disk:
                return slots.read_slots(disk)
        except OSError as e:
            raise SlotError(f"cannot read the slots of {self.machine.disk}: {e}") from e
