"""SSH plumbing for VMs: the harness's key pair, its ssh_config and ssh command lines.

Everything that talks to a guest (our own `ssh` calls, testinfra's ssh backend, the line printed for
a developer) goes through one per-VM ssh_config file, so the options cannot drift apart.
"""

from __future__ import annotations

import os
from pathlib import Path

from builder.run import find_tool, run

GUEST_USER = "root"
GUEST_HOST = "127.0.0.1"


def generate_key(path: Path) -> Path:
    """Create an unencrypted ed25519 key pair at `path` (and `path`.pub); return the public key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "berth-vm-harness", "-f", path],
        quiet=True,
    )
    return public_key_path(path)


def public_key_path(private_key: Path) -> Path:
    return private_key.with_name(private_key.name + ".pub")


def write_ssh_config(path: Path, *, port: int, identity: Path) -> Path:
    """Write the ssh_config for one VM; host keys change with every image, so none are recorded."""
    text = "\n".join(
        [
            "Host *",
            f"  HostName {GUEST_HOST}",
            f"  Port {port}",
            f"  User {GUEST_USER}",
            f"  IdentityFile {identity}",
            "  IdentitiesOnly yes",
            "  IdentityAgent none",
            "  BatchMode yes",
            "  StrictHostKeyChecking no",
            "  UserKnownHostsFile /dev/null",
            "  GlobalKnownHostsFile /dev/null",
            "  LogLevel ERROR",
            "  ConnectTimeout 10",
            # A guest that is killed or rebooted must not leave a command hanging forever.
            "  ServerAliveInterval 5",
            "  ServerAliveCountMax 3",
            "",
        ]
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def ssh_argv(
    config: Path, port: int, command: str | None = None, *, connect_timeout: int | None = None
) -> list[str]:
    """The ssh command line for the VM; without `command` it opens an interactive login."""
    argv = [find_tool("ssh"), "-F", str(config), "-p", str(port)]
    if connect_timeout is not None:
        argv += ["-o", f"ConnectTimeout={connect_timeout}"]
    argv.append(f"{GUEST_USER}@{GUEST_HOST}")
    if command is not None:
        argv.append(command)
    return argv
