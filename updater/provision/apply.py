"""Apply a `Plan` to the machine: prepare everything, then commit it in one short step.

"All or nothing" is the contract. `prepare` does all the work that can fail — reading the
account databases, checking that a file Ignition may not overwrite is absent, that no directory
stands where an entry goes and that parents are directories, finding the `[Install]` section of
a unit to enable, writing every new file's bytes to a temporary name beside its destination and
fsyncing it, and hard-linking a backup beside every entry the commit will replace or remove. If
any of that fails, the temporaries, backups and the directories made for them are removed and
the machine is as it was. `--check --root` runs the same `prepare` and discards it.

Commit is then only renames (atomic, on the same file system as their destination), unlinks of
enablement links and chmods of existing directories. If one fails (the tree changed since it was
prepared), the steps before it are undone from the backups; if systemd will not reload or start
the units afterwards, the whole commit is. Either way the tree is as it was, and a corrected
config meets a clean machine. The caller writes the provisioned stamp only after all of this.

Accounts are written as whole new `/etc/passwd`, `/etc/shadow`, `/etc/group` and `/etc/gshadow`
files, staged like any other file, rather than with `useradd`: a tool run at commit time could fail
half way, and the image does not need to carry the shadow suite for it.

After the commit, systemd is reloaded and the units the config enabled (and quadlet containers with
an `[Install]` section) are started (`--no-block`: queued, not waited for): this runs during boot,
after the boot transaction was computed, so units enabled now would otherwise wait for the next
boot. `runcmd` entries and a user-data script run last, once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from updater import run
from updater.errors import CommandError
from updater.files import Resolved, fsync_dir, resolve_in_root
from updater.provision.plan import (
    QUADLET_DIR,
    QUADLET_SUFFIXES,
    SYSTEMD_DIR,
    WRITABLE_ROOTS,
    Command,
    Plan,
    ProvisionError,
    Unit,
    User,
    field_error,
    in_writable_roots,
    unit_path,
)

# Where an enabled unit's [Install] section is looked for when the config gives no contents.
UNIT_SEARCH = ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")
SCRIPT_PATH = "/var/lib/berth/provision/user-data"
FIRST_UID = 1000
LAST_UID = 59999
# Subordinate id ranges (/etc/subuid, /etc/subgid) for rootless containers: login.defs(5)'s
# defaults, as useradd hands them out. One range per user, the same in both files.
SUB_ID_FILES = ("/etc/subuid", "/etc/subgid")
SUB_ID_MIN = 100000
SUB_ID_MAX = 600100000
SUB_ID_COUNT = 65536
# A command (runcmd, the user-data script, systemctl) may take as long as the whole unit may
# (berth-provision.service's TimeoutStartSec): the limit names the command that hung, where
# systemd would only stop the unit.
COMMAND_TIMEOUT = 600.0

Runner = Callable[[Sequence[str]], None]


def run_command(argv: Sequence[str]) -> None:
    """Run a command with its output on the service's stdout (journal and console)."""
    sys.stdout.flush()
    try:
        result = run.run(argv, timeout=COMMAND_TIMEOUT, output=run.Output.INHERIT, check=False)
    except CommandError as e:
        raise ProvisionError(str(e)) from e
    if result.returncode != 0:
        raise ProvisionError(f"{' '.join(argv)} exited with status {result.returncode}")


@dataclass
class _Stage:
    """Staged changes under `root`: temporaries to rename, links to remove, dirs made for them.

    Every path is taken as the root itself will see it: links are followed inside the root (an
    absolute target starts again at `root`), the plan's own links included, as if already made.
    Whatever is written must then lie under WRITABLE_ROOTS (`writable`): a link in /etc to /usr
    or /run is never written through, and a test's root never leaks onto the host.

    Whatever the commit replaces or removes is first hard-linked to a backup name beside it
    (`_keep`), so that a commit that fails part way puts every entry back (`_undo`).
    """

    root: Path
    source: str = ""  # the plan's, for messages
    links: dict[str, str] = field(default_factory=dict)  # the plan's symbolic links: path -> target
    renames: list[tuple[Path, Path]] = field(default_factory=list)  # (temporary, destination)
    unlinks: list[Path] = field(default_factory=list)
    chmods: list[tuple[Path, int, int]] = field(default_factory=list)  # (dir, new mode, old mode)
    made_dirs: list[Path] = field(default_factory=list)
    staged: dict[str, Path] = field(default_factory=dict)  # image path -> its temporary
    owners: dict[Path, str] = field(default_factory=dict)  # destination -> what stages it
    backups: dict[Path, Path] = field(default_factory=dict)  # entry the commit changes -> backup
    done: list[tuple[str, Path, int]] = field(
        default_factory=list
    )  # committed: (step, entry, mode)

    def _readlink(self, candidate: str) -> str | None:
        if candidate in self.links:
            return self.links[candidate]
        try:
            return os.readlink(self._on_host(candidate))
        except OSError:  # not a link, or not there
            return None

    def _on_host(self, path: str) -> Path:
        return Path(os.fspath(self.root).rstrip("/") + path)

    def _resolve(self, path: str, follow: bool) -> Resolved:
        try:
            return resolve_in_root(path, self._readlink, follow=follow)
        except OSError:
            raise ProvisionError(
                f"{self.source}: {path}: too many levels of symbolic links on this machine"
            ) from None

    def host(self, path: str, *, follow: bool = False) -> Path:
        """Where `path` is on this host, for reading: links followed inside the root (a last
        one only with `follow`)."""
        return self._on_host(self._resolve(path, follow).path)

    def writable(self, path: str, what: str, *, follow: bool = False) -> Path:
        """As `host`, for a path about to be written: refused, naming `what`, unless it lies
        under WRITABLE_ROOTS once links are followed."""
        found = self._resolve(path, follow)
        if not in_writable_roots(found.path):
            through = ", ".join(f"{link} -> {target}" for link, target in found.links)
            raise field_error(
                self.source,
                what,
                "a path that stays under " + ", ".join(WRITABLE_ROOTS) + " once symbolic links "
                f"on this machine are followed, but {path} leads to {found.path}"
                + (f" through {through}" if through else ""),
            )
        return self._on_host(found.path)

    def exists(self, path: str) -> bool:
        return path in self.staged or os.path.lexists(self.host(path))

    def ensure_dir(
        self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0, what: str = ""
    ) -> None:
        """Make `path` and missing parents now; they are removed again if staging fails."""
        what = what or f"directory {path}"
        host = self.writable(path, what, follow=True)
        missing: list[Path] = []
        probe = host
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        if not probe.is_dir():
            raise ProvisionError(
                f"{self.source}: {what}: {self._in_root(probe)} is a file on this machine, not a "
                f"directory, so {path} cannot be made"
            )
        for directory in reversed(missing):
            directory.mkdir()
            self.made_dirs.append(directory)
            # The mode asked for applies to the directory itself; parents made on the way get
            # the usual 0755, owned by root.
            if directory == host:
                os.chown(directory, uid, gid)
                os.chmod(directory, mode)
            else:
                os.chmod(directory, 0o755)

    def _in_root(self, host: Path) -> str:
        """A host path as the root sees it, for messages."""
        return "/" + os.path.relpath(host, self.root).removeprefix(".")

    def _destination(self, path: str, what: str) -> Path:
        """Where a new entry for `path` goes (a link there is replaced, not written through),
        with its directory made; refused if something else of this config goes there too, or a
        directory is there (a rename cannot replace it)."""
        destination = self.writable(path, what)
        if destination in self.owners:
            # check_collisions sees the paths a config names; this sees what only the machine
            # says: an existing account's home, enablement links named by [Install] sections.
            raise ProvisionError(
                f"{self.source}: {what}: {path} is written by {self.owners[destination]} too"
            )
        if destination.is_dir() and not destination.is_symlink():
            raise ProvisionError(
                f"{self.source}: {what}: {path} is a directory on this machine; it is not replaced"
            )
        self.ensure_dir(str(PurePosixPath(path).parent), what=what)
        self.owners[destination] = what
        return destination

    def _temporary(self, destination: Path) -> Path:
        return destination.parent / f".berth-provision.{os.getpid()}.{len(self.renames)}"

    def file(
        self, path: str, data: bytes, mode: int, uid: int = 0, gid: int = 0, what: str = ""
    ) -> None:
        destination = self._destination(path, what or f"file {path}")
        fd, name = tempfile.mkstemp(dir=destination.parent, prefix=".berth-provision.")
        temp = Path(name)
        self.renames.append((temp, destination))
        self.staged[path] = temp
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchown(f.fileno(), uid, gid)
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())

    def take(self, path: str) -> bytes | None:
        """The bytes staged for `path`, unstaged again (to be staged anew, merged); None if
        nothing is staged there."""
        temp = self.staged.pop(path, None)
        if temp is None:
            return None
        index = next(i for i, (t, _) in enumerate(self.renames) if t == temp)
        _, destination = self.renames.pop(index)
        del self.owners[destination]
        data = temp.read_bytes()
        temp.unlink()
        return data

    def symlink(self, path: str, target: str, what: str = "") -> None:
        destination = self._destination(path, what or f"link {path}")
        temp = self._temporary(destination)
        os.symlink(target, temp)
        self.renames.append((temp, destination))
        self.staged[path] = temp

    def hardlink(self, path: str, target: str) -> None:
        what = f"link {path}"
        destination = self._destination(path, what)
        # A target the same config creates is linked through its staged temporary: same inode.
        source = self.staged.get(target) or self.writable(target, f"{what} target", follow=True)
        if not source.exists():
            raise ProvisionError(f"{path}: hard link target {target} does not exist")
        if source.is_dir():
            raise ProvisionError(f"{self.source}: {what}: the target {target} is a directory")
        temp = self._temporary(destination)
        os.link(source, temp)
        self.renames.append((temp, destination))
        self.staged[path] = temp

    def keep_backups(self) -> None:
        """The last staging step: a hard link beside every entry the commit will replace or
        remove, to put it back with. Costs no space; a link keeps a link, not its target."""
        for number, entry in enumerate([d for _, d in self.renames] + self.unlinks):
            if entry in self.backups or not os.path.lexists(entry):
                continue
            backup = entry.parent / f".berth-provision.{os.getpid()}.old.{number}"
            os.link(entry, backup, follow_symlinks=False)
            self.backups[entry] = backup

    def discard(self) -> None:
        """Remove every temporary, backup and directory staging made."""
        for temp in [t for t, _ in self.renames] + list(self.backups.values()):
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        for directory in reversed(self.made_dirs):
            with contextlib.suppress(OSError):
                directory.rmdir()

    def commit(self) -> None:
        """Rename, unlink and chmod; if any step fails, undo the steps before it, discard, and
        raise ProvisionError: the tree is as it was before staging. The backups stay until
        `finish` (or `revert` puts them back)."""
        done = self.done
        try:
            for temp, destination in self.renames:
                if destination.is_dir() and not destination.is_symlink():
                    # Refused while staging; here only if the tree changed since.
                    raise IsADirectoryError(errno.EISDIR, "a directory is there", destination)
                os.replace(temp, destination)
                done.append(("rename", destination, 0))
            for link in self.unlinks:
                with contextlib.suppress(FileNotFoundError):
                    link.unlink()
                    done.append(("unlink", link, 0))
            for directory, mode, old in self.chmods:
                os.chmod(directory, mode)
                done.append(("chmod", directory, old))
            for directory in sorted(
                {d.parent for _, d in self.renames} | {u.parent for u in self.unlinks}
            ):
                fsync_dir(directory)
        except OSError as e:
            undone = self._undo(done)
            self.discard()
            raise ProvisionError(
                f"{self.source}: committing the config failed: {e}; "
                + (
                    "every change was undone"
                    if undone
                    else "undoing it failed too: see the journal for what is left"
                )
            ) from e
        except BaseException:
            self._undo(done)
            self.discard()
            raise

    def finish(self) -> None:
        """The commit stands: its backups go."""
        for backup in self.backups.values():
            with contextlib.suppress(FileNotFoundError):
                backup.unlink()
        self.backups.clear()

    def revert(self) -> bool:
        """Undo a whole commit and discard; False if some of it could not be undone."""
        undone = self._undo(self.done)
        self.done.clear()
        self.discard()
        return undone

    def _undo(self, done: list[tuple[str, Path, int]]) -> bool:
        """Put back what `done` changed, latest first; False if some of it could not be."""
        ok = True
        for step, entry, old in reversed(done):
            try:
                if step == "chmod":
                    os.chmod(entry, old)
                elif entry in self.backups:
                    os.replace(self.backups.pop(entry), entry)
                elif step == "rename":
                    entry.unlink()  # a new entry: there was nothing
                else:
                    raise FileNotFoundError(errno.ENOENT, "its backup is gone", entry)
            except OSError as e:
                print(f"berth-provision: cannot undo the change to {entry}: {e}", flush=True)
                ok = False
        return ok


@dataclass(frozen=True)
class Applied:
    """What the commit changed, for the console summary and the post-commit steps."""

    summary: tuple[str, ...]
    start: tuple[str, ...]  # units to start now (enabled by the config, quadlets with [Install])
    reload: bool  # units or quadlet files changed: systemd must re-read them


def apply_plan(
    plan: Plan, root: Path = Path("/"), *, runner: Runner = run_command, live: bool | None = None
) -> Applied:
    """Stage and commit `plan` onto the tree at `root`; then reload systemd and start units.

    `live` (default: root is "/") also sets the running hostname and talks to systemd; tests
    apply to a directory tree with it off. Commands and scripts are run by `run_commands`.
    """
    live = root == Path("/") if live is None else live
    prepared = prepare(plan, root)
    prepared.stage.commit()
    summary, start, reload = prepared.summary, prepared.start, prepared.reload
    try:
        # systemd must take the units (a unit file it cannot load fails `start`): until it has,
        # the commit can still be undone, so that a corrected config meets a clean machine.
        if live and reload:
            runner(["systemctl", "daemon-reload"])
        if live and start:
            runner(["systemctl", "start", "--no-block", *start])
    except ProvisionError as e:
        undone = prepared.stage.revert()
        if live and reload:
            with contextlib.suppress(ProvisionError):
                runner(["systemctl", "daemon-reload"])  # forget the units again
        raise ProvisionError(
            f"{plan.source}: {e}; "
            + ("every change was undone" if undone else "undoing the commit failed too")
        ) from e
    prepared.stage.finish()
    if live:
        # An Ignition config names the host by writing /etc/hostname; systemd read that file
        # before we ran, so the running name is set too.
        hostname = plan.hostname or next(
            (
                f.contents.decode(errors="replace").strip()
                for f in plan.files
                if f.path == "/etc/hostname"
            ),
            None,
        )
        if hostname:
            try:
                socket.sethostname(hostname)
            except OSError as e:
                # The file is committed and names the host from the next boot on.
                print(f"berth-provision: cannot set the hostname {hostname!r} now: {e}")
    return Applied(summary, start, reload)


@dataclass
class Prepared:
    """A plan staged onto a tree: every check made, every byte written beside its destination.
    `commit` puts it in place (or nothing), `discard` leaves the tree as it was."""

    stage: _Stage
    summary: tuple[str, ...]
    start: tuple[str, ...]
    reload: bool

    def commit(self) -> None:
        """Commit, and drop the backups: for callers with nothing to do before the commit stands
        (apply_plan keeps them until systemd has taken the units)."""
        self.stage.commit()
        self.stage.finish()

    def discard(self) -> None:
        self.stage.discard()


def prepare(plan: Plan, root: Path = Path("/")) -> Prepared:
    """Stage `plan` onto the tree at `root`, making every check that apply makes (`--check
    --root` calls this, then `discard`); raise ProvisionError, with the tree as it was, if one
    fails or the tree cannot be written (a full disk, a read-only directory)."""
    stage = _Stage(
        root, plan.source, {link.path: link.target for link in plan.links if not link.hard}
    )
    try:
        summary, start, reload = _stage_plan(plan, stage)
        stage.keep_backups()
    except OSError as e:
        stage.discard()
        raise ProvisionError(f"{plan.source}: staging the config failed: {e}") from e
    except BaseException:
        stage.discard()
        raise
    return Prepared(stage, tuple(summary), tuple(start), reload)


def run_commands(plan: Plan, root: Path = Path("/"), *, runner: Runner = run_command) -> None:
    """`runcmd` entries in order, then the user-data script; the first failure stops the rest."""
    for number, command in enumerate(plan.commands):
        argv = _argv(command)
        print(f"berth-provision: runcmd[{number}]: {' '.join(argv)}", flush=True)
        try:
            runner(argv)
        except ProvisionError as e:
            raise ProvisionError(f"{plan.source}: runcmd[{number}] failed: {e}") from e
    if plan.script is not None:
        script = root / SCRIPT_PATH.lstrip("/")
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_bytes(plan.script)
        script.chmod(0o700)
        print(f"berth-provision: running the user-data script ({len(plan.script)} bytes)")
        try:
            runner([str(script)])
        except ProvisionError as e:
            raise ProvisionError(f"{plan.source}: the user-data script failed: {e}") from e


def _argv(command: Command) -> list[str]:
    if command.shell is not None:
        return ["/bin/sh", "-c", command.shell]
    return list(command.argv)


def _stage_plan(plan: Plan, stage: _Stage) -> tuple[list[str], list[str], bool]:
    summary: list[str] = []
    if plan.hostname:
        stage.file("/etc/hostname", f"{plan.hostname}\n".encode(), 0o644, what="hostname")
        summary.append(f"hostname {plan.hostname}")
    for directory in plan.directories:
        # Followed to the end: an existing directory's mode is set on what the link names.
        host = stage.writable(directory.path, f"directory {directory.path}", follow=True)
        if host.exists() and not host.is_dir():
            raise ProvisionError(f"{plan.source}: directory {directory.path}: a file is there")
        if host.is_dir():
            # Ignition sets the mode of a directory that already exists, too (at commit).
            stage.chmods.append((host, directory.mode, stat.S_IMODE(host.stat().st_mode)))
        else:
            stage.ensure_dir(directory.path, directory.mode)
        summary.append(f"directory {directory.path}")
    for file in plan.files:
        host = stage.writable(file.path, f"file {file.path}")
        if host.is_dir() and not host.is_symlink():
            raise ProvisionError(f"{plan.source}: file {file.path}: a directory is there")
        data, mode = file.contents, file.mode
        existing = stage.host(file.path, follow=True)
        if file.append and existing.is_file():
            # Appending keeps the file's own mode, as Ignition and cloud-init do.
            data, mode = existing.read_bytes() + data, stat.S_IMODE(existing.stat().st_mode)
        elif stage.exists(file.path) and not (file.overwrite or file.append):
            raise ProvisionError(f"{plan.source}: file {file.path} exists and overwrite is false")
        stage.file(file.path, data, mode)
        summary.append(f"file {file.path}")
    for link in plan.links:
        if stage.exists(link.path) and not link.overwrite:
            raise ProvisionError(f"{plan.source}: link {link.path} exists and overwrite is false")
        if link.hard:
            stage.hardlink(link.path, link.target)
        else:
            stage.symlink(link.path, link.target)
        summary.append(f"link {link.path} -> {link.target}")
    if plan.users:
        summary += _stage_users(plan, stage)
    start: list[str] = []
    for unit in plan.units:
        summary += _stage_unit(plan.source, unit, stage, start)
    touched = [f.path for f in plan.files] + [link.path for link in plan.links]
    reload = bool(plan.units) or any(
        p.startswith((SYSTEMD_DIR + "/", QUADLET_DIR + "/")) for p in touched
    )
    for file in plan.files:
        if file.path.startswith(QUADLET_DIR + "/") and _has_install(
            file.contents.decode(errors="replace")
        ):
            service = _quadlet_service(PurePosixPath(file.path).name)
            if service and service not in start:
                start.append(service)
    return summary, start, reload


# -- accounts ------------------------------------------------------------------------------------


def _read_db(stage: _Stage, path: str) -> list[list[str]]:
    host = stage.host(path, follow=True)
    if not host.exists():
        return []
    # Bytes that are not UTF-8 (a GECOS field in Latin-1) are carried through unchanged.
    text = host.read_bytes().decode("utf-8", "surrogateescape")
    return [line.split(":") for line in text.splitlines() if line.strip()]


def _write_db(stage: _Stage, path: str, rows: list[list[str]], mode: int) -> None:
    host = stage.host(path, follow=True)
    gid = host.stat().st_gid if host.exists() else 0
    text = "".join(":".join(r) + "\n" for r in rows)
    stage.file(path, text.encode("utf-8", "surrogateescape"), mode, 0, gid, f"accounts {path}")


def _number(row: list[str], index: int) -> int | None:
    """A uid or gid field of an account database row; None if the row has no such number."""
    if len(row) > index and row[index].isascii() and row[index].isdigit():
        return int(row[index])
    return None


def _stage_users(plan: Plan, stage: _Stage) -> list[str]:
    passwd = _read_db(stage, "/etc/passwd")
    shadow = _read_db(stage, "/etc/shadow")
    group = _read_db(stage, "/etc/group")
    gshadow = _read_db(stage, "/etc/gshadow")
    summary: list[str] = []
    homes: list[tuple[User, str, int, int]] = []
    for user in plan.users:
        entry = next((r for r in passwd if r[0] == user.name), None)
        if entry is None:
            uid = _free_id({n for r in passwd if (n := _number(r, 2)) is not None})
            used_gids = {n for r in group if (n := _number(r, 2)) is not None}
            if any(g[0] == user.name for g in group):
                raise ProvisionError(
                    f"{plan.source}: user {user.name}: a group of that name already exists"
                )
            gid = uid if uid not in used_gids else _free_id(used_gids)
            home = f"/home/{user.name}"
            passwd.append([user.name, "x", str(uid), str(gid), "", home, "/bin/bash"])
            days = str(int(time.time()) // 86400)
            shadow.append([user.name, "*", days, "0", "99999", "7", "", "", ""])
            group.append([user.name, "x", str(gid), ""])
            if gshadow or stage.host("/etc/gshadow").exists():
                gshadow.append([user.name, "!", "", ""])
            summary.append(f"user {user.name} created (uid {uid})")
            homes.append((user, home, uid, gid))
        else:
            found_uid, found_gid = _number(entry, 2), _number(entry, 3)
            if found_uid is None or found_gid is None or len(entry) < 7:
                raise ProvisionError(
                    f"{plan.source}: user {user.name}: its line in /etc/passwd on this machine "
                    "is not name:password:uid:gid:gecos:home:shell"
                )
            uid, gid, home = found_uid, found_gid, posixpath.normpath(entry[5] or ".")
            summary.append(f"user {user.name} updated")
            if user.ssh_authorized_keys:
                # Refused now, before anything else is staged, naming where the home is.
                _writable_home(plan, stage, user, home)
            homes.append((user, home, uid, gid))
        if user.password_hash is not None:
            row = next((r for r in shadow if r[0] == user.name), None)
            if row is None:
                raise ProvisionError(f"{plan.source}: user {user.name}: no entry in /etc/shadow")
            row[1] = user.password_hash
        for name in user.groups:
            for table in (group, gshadow):
                row = next((r for r in table if r[0] == name), None)
                if row is None:
                    if table is gshadow:
                        continue
                    raise ProvisionError(
                        f"{plan.source}: user {user.name}: group {name!r} does not exist on "
                        "this image"
                    )
                members = [m for m in row[-1].split(",") if m]
                if user.name not in members:
                    row[-1] = ",".join([*members, user.name])
    _write_db(stage, "/etc/passwd", passwd, 0o644)
    _write_db(stage, "/etc/group", group, 0o644)
    _write_db(stage, "/etc/shadow", shadow, 0o640)
    if gshadow or stage.host("/etc/gshadow").exists():
        _write_db(stage, "/etc/gshadow", gshadow, 0o640)
    summary += _stage_sub_ids(plan, stage)
    for user, home, uid, gid in homes:
        _stage_home(stage, user, home, uid, gid)
    return summary


def _stage_sub_ids(plan: Plan, stage: _Stage) -> list[str]:
    """Give every login of the plan but root a subordinate uid and gid range, so that rootless
    podman works for it. A user who has one keeps it (in either file: the same range goes to
    both); a new range overlaps no range of either file, so it stays the user's for good."""
    tables = {path: _read_db(stage, path) for path in SUB_ID_FILES}
    taken: list[tuple[int, int]] = []
    for path, rows in tables.items():
        for number, row in enumerate(rows, 1):
            start, count = (_number(row, 1), _number(row, 2)) if len(row) == 3 else (None, None)
            if start is None or count is None:
                raise ProvisionError(
                    f"{plan.source}: {path} on this machine, line {number}: expected "
                    f"name:first id:count, got {':'.join(row)!r}"
                )
            taken.append((start, start + count))
    summary: list[str] = []
    changed = False
    for user in plan.users:
        if user.name == "root":
            continue
        existing = next((r for rows in tables.values() for r in rows if r[0] == user.name), None)
        if existing is not None:
            given = [existing[0], existing[1], existing[2]]
        else:
            start = _free_range(taken)
            taken.append((start, start + SUB_ID_COUNT))
            given = [user.name, str(start), str(SUB_ID_COUNT)]
            summary.append(f"user {user.name}: subordinate ids {start}-{start + SUB_ID_COUNT - 1}")
        for rows in tables.values():
            if not any(r[0] == user.name for r in rows):
                rows.append(given)
                changed = True
    if changed:
        for path, rows in tables.items():
            _write_db(stage, path, rows, 0o644)
    return summary


def _free_range(taken: list[tuple[int, int]]) -> int:
    start = SUB_ID_MIN
    for low, high in sorted(taken):
        if start + SUB_ID_COUNT <= low:
            break
        start = max(start, high)
    if start + SUB_ID_COUNT > SUB_ID_MAX:
        raise ProvisionError(
            f"no free subordinate id range of {SUB_ID_COUNT} below {SUB_ID_MAX} in "
            + " and ".join(SUB_ID_FILES)
        )
    return start


def _free_id(used: set[int]) -> int:
    for candidate in range(FIRST_UID, LAST_UID + 1):
        if candidate not in used:
            return candidate
    raise ProvisionError(f"no free user or group id between {FIRST_UID} and {LAST_UID}")


def _writable_home(plan: Plan, stage: _Stage, user: User, home: str) -> None:
    """Refuse an existing account's home that provisioning cannot write SSH keys into."""
    what = f"user {user.name}"
    if not home.startswith("/") or not in_writable_roots(home):
        # /etc/passwd says where (system accounts live in /nonexistent, /usr/sbin, /run/...):
        # keys written there would land on the read-only image or vanish at the next boot.
        raise field_error(
            plan.source,
            what,
            "an account whose home is under " + ", ".join(WRITABLE_ROOTS) + " to give SSH keys "
            f"to, but /etc/passwd says its home is {home!r}",
        )
    stage.writable(home, f"{what}'s home", follow=True)


def _stage_home(stage: _Stage, user: User, home: str, uid: int, gid: int) -> None:
    what = f"user {user.name}'s home"
    ssh = f"{home}/.ssh"
    for path in (home, ssh):
        made = stage.host(path, follow=True)
        if made in stage.made_dirs:
            # A file of the config under a new home made it on the way, as root's and 0755:
            # the home (and ~/.ssh, which sshd wants private) is the user's all the same.
            os.chown(made, uid, gid)
            os.chmod(made, 0o700)
    if not user.ssh_authorized_keys:
        # Only a missing home is made, and only where provisioning writes: an existing system
        # account that joins a group keeps its /nonexistent.
        if (
            home.startswith("/")
            and in_writable_roots(home)
            and not stage.host(home, follow=True).exists()
        ):
            stage.ensure_dir(home, 0o700, uid, gid, what)
        return
    if not stage.writable(home, what, follow=True).exists():
        stage.ensure_dir(home, 0o700, uid, gid, what)
    if not stage.writable(ssh, what, follow=True).exists():
        stage.ensure_dir(ssh, 0o700, uid, gid, what)
    keys = f"{ssh}/authorized_keys"
    keys_file = stage.host(keys, follow=True)
    # A file of the config at this path comes first, then the keys (check_collisions lets the
    # two meet only here); else keys already there (say, from the ssh.authorized_keys.root
    # credential) are kept.
    given = stage.take(keys)
    if given is None and keys_file.is_file():
        given = keys_file.read_bytes()
    existing = (given or b"").decode("utf-8", "surrogateescape").splitlines()
    new = [k for k in user.ssh_authorized_keys if k.strip() not in {e.strip() for e in existing}]
    lines = existing + new
    data = "".join(k + "\n" for k in lines).encode("utf-8", "surrogateescape")
    stage.file(keys, data, 0o600, uid, gid, what)


# -- units ---------------------------------------------------------------------------------------


def _is_quadlet(name: str) -> bool:
    return name.endswith(QUADLET_SUFFIXES)


def _quadlet_service(name: str) -> str | None:
    stem, _, suffix = name.rpartition(".")
    return {
        "container": f"{stem}.service",
        "kube": f"{stem}.service",
        "pod": f"{stem}-pod.service",
    }.get(suffix)


def _install_section(text: str) -> dict[str, list[str]]:
    section: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        if current == "Install" and "=" in line:
            key, _, value = line.partition("=")
            section.setdefault(key.strip(), []).extend(value.split())
    return section


def _has_install(text: str) -> bool:
    return bool(_install_section(text))


def _stage_unit(source: str, unit: Unit, stage: _Stage, start: list[str]) -> list[str]:
    summary: list[str] = []
    what = f"unit {unit.name}"
    quadlet = _is_quadlet(unit.name)
    path = unit_path(unit.name)
    if unit.mask:
        if quadlet:
            raise ProvisionError(f"{source}: unit {unit.name}: quadlet files cannot be masked")
        stage.symlink(path, "/dev/null", what)
        summary.append(f"unit {unit.name} masked")
    elif unit.contents is not None:
        stage.file(path, unit.contents.encode(), 0o644, what=what)
        summary.append(f"unit {unit.name}")
    for dropin in unit.dropins:
        stage.file(f"{path}.d/{dropin.name}", dropin.contents.encode(), 0o644, what=what)
        summary.append(f"drop-in {unit.name}.d/{dropin.name}")
    if quadlet:
        if unit.enabled is not None:
            raise ProvisionError(
                f"{source}: unit {unit.name}: a quadlet file is started by its own [Install] "
                "section, not by enabled"
            )
        text = unit.contents or ""
        service = _quadlet_service(unit.name)
        if service and _has_install(text) and not unit.mask:
            start.append(service)
        return summary
    if unit.enabled is True and not unit.mask:
        text = unit.contents if unit.contents is not None else _image_unit(source, unit.name, stage)
        install = _install_section(text)
        for key in ("WantedBy", "RequiredBy", "Alias"):
            for name in install.get(key, []):
                # Each becomes a file name under /etc/systemd/system: `a/../../b` would not.
                if "/" in name or name in (".", "..") or "\0" in name:
                    raise ProvisionError(
                        f"{source}: unit {unit.name}: {key}= names {name!r}; expected unit "
                        "names (one file name each)"
                    )
        targets = [("wants", t) for t in install.get("WantedBy", [])]
        targets += [("requires", t) for t in install.get("RequiredBy", [])]
        aliases = install.get("Alias", [])
        if not targets and not aliases:
            raise ProvisionError(
                f"{source}: unit {unit.name}: enabled is true but the unit has no WantedBy=, "
                "RequiredBy= or Alias= in an [Install] section"
            )
        if "@." in unit.name and "DefaultInstance" not in install:
            raise ProvisionError(
                f"{source}: unit {unit.name}: a template unit needs DefaultInstance= to be enabled"
            )
        target_path = _unit_path(unit.name, stage) if unit.contents is None else path
        for kind, target in targets:
            link = f"{SYSTEMD_DIR}/{target}.{kind}/{unit.name}"
            if not os.path.lexists(stage.host(link)):
                stage.symlink(link, target_path, what)
        for alias in aliases:
            stage.symlink(f"{SYSTEMD_DIR}/{alias}", target_path, what)
        start.append(unit.name)
        summary.append(f"unit {unit.name} enabled")
    elif unit.enabled is False:
        admin = stage.writable(SYSTEMD_DIR, what, follow=True)
        if admin.is_dir():
            for holder in sorted(admin.iterdir()):
                if holder.name.endswith((".wants", ".requires")) and holder.is_dir():
                    wanted = holder / unit.name
                    if wanted.is_symlink():
                        stage.unlinks.append(wanted)
        summary.append(f"unit {unit.name} disabled")
    return summary


def _unit_path(name: str, stage: _Stage) -> str:
    for directory in UNIT_SEARCH:
        candidate = f"{directory}/{name}"
        host = stage.host(candidate)
        if host.is_file() or host.is_symlink():
            return candidate
    return f"{SYSTEMD_DIR}/{name}"


def _image_unit(source: str, name: str, stage: _Stage) -> str:
    for directory in UNIT_SEARCH:
        host = stage.host(f"{directory}/{name}", follow=True)
        if host.is_file():
            # Read for its [Install] section only: bytes that are not UTF-8 elsewhere do not matter.
            return host.read_bytes().decode("utf-8", "replace")
    raise ProvisionError(
        f"{source}: unit {name}: enabled is true but no such unit is on the image and the config "
        "gives no contents"
    )


def describe(applied: Applied) -> str:
    return "; ".join(applied.summary) if applied.summary else "nothing to change"
