"""Updates, automatic rollback, tampering and power loss on machines booted under QEMU.

Releases are built by the project's builder (1.0.0 is the session's image; the others reuse its
package cache), published with its publisher and keys, and served by nginx on loopback. The
daemon, not a test command, finds and installs them. Boots are the expensive part under TCG,
so each machine walks through several scenarios in order; every scenario prints one summary
line (case, boots, seconds, outcome) and the session ends with the table (tests/support/e2e.py).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from builder.image import BuildResult
from builder.publish import pcrkey
from qemu import Firmware
from qemu.drives import make_vfat
from qemu.secureboot import enrolled_vars
from qemu.ssh import generate_key
from tests.support import REPO
from tests.support.containers import install_web_service, load_httpd_image, web_answers, web_starts
from tests.support.e2e import MARKER, PANIC_WORD, Machine, Site, build_release, record
from tests.support.oci import SLEEPER_C, oci_archive, static_binary
from tests.support.vms import login_as
from updater.release.manifest import PAYLOAD_FILES

# Power cuts: 4 in CI, one in each phase of an update; 20 in the slow run (-m slow);
# BERTH_POWER_SEED replays a run's random moments.
POWER_CUTS = int(os.environ.get("BERTH_POWER_CUTS", "4"))
SLOW_POWER_CUTS = int(os.environ.get("BERTH_SLOW_POWER_CUTS", "20"))


class Releases:
    """Versions after the session's 1.0.0, each built once per module on first use."""

    def __init__(self, base: BuildResult, work: Path) -> None:
        self.base = base
        self.work = work
        self._built: dict[str, BuildResult] = {}

    def get(self, version: str, **options: object) -> BuildResult:
        if version not in self._built:
            self._built[version] = build_release(
                self.base,
                version,
                self.work / "out",
                self.work,
                **options,  # type: ignore[arg-type]
            )
        return self._built[version]

    def good(self) -> BuildResult:
        """2.0.0: a marker file, and one package more than 1.0.0: tinyproxy, whose maintainer
        script makes a system user that its service runs as, with a log directory in /var."""
        return self.get(
            "2.0.0",
            marker="e2e 2.0.0",
            packages=(NEW_PACKAGE,),
            files=((DRIFTING, "from 2.0.0\n"),),  # the machine has its own copy by then
        )

    def panics(self) -> BuildResult:
        """3.0.0: its UKI's kernel cannot start the initrd and panics."""
        return self.get("3.0.0", cmdline=(PANIC_WORD,))

    def unhealthy(self) -> BuildResult:
        """4.0.0: boots, but the operator's health hook and a required unit fail on it."""
        return self.get("4.0.0")

    def other_pcr_key(self) -> BuildResult:
        """5.0.0: the same keys as 1.0.0 (TUF, Secure Boot) but another PCR key: it installs and
        the firmware starts it, but its UKI's PCR 11 signature cannot unlock STATE."""
        keys = self.work / "keys-other-pcr"
        if not keys.exists():
            shutil.copytree(REPO / "keys", keys, ignore=shutil.ignore_patterns("tpm2"))
            pcrkey.init_pcr_key(keys)
        return self.get("5.0.0", keys_dir=keys)


@pytest.fixture(scope="module")
def releases(built_image: BuildResult, tmp_path_factory: pytest.TempPathFactory) -> Releases:
    return Releases(built_image, tmp_path_factory.mktemp("releases"))


@pytest.fixture
def machine(built_image: BuildResult, artifacts: Path) -> Iterator[Machine]:
    """Secure Boot's firmware in setup mode, as a new machine comes: systemd-boot enrols the
    keys on the image's ESP at the first start, and every boot after that is enforced."""
    # With a TPM: first boot encrypts STATE, and every boot of every scenario unlocks it.
    m = Machine(built_image, artifacts / "vm", firmware=Firmware.SECURE_BOOT, tpm=artifacts / "tpm")
    try:
        yield m
    finally:
        m.save_logs(artifacts)
        m.close()


# 2.0.0's extra package (Releases.good) and the local user 1.0.0 is provisioned with.
NEW_PACKAGE = "tinyproxy"
LOCAL_USER = "dora"
# An /etc file the operator writes on 1.0.0 and 2.0.0 ships too: it stops following the image.
DRIFTING = "/etc/berth-e2e.conf"


@pytest.fixture
def provisioned_machine(
    built_image: BuildResult, artifacts: Path, tmp_path: Path
) -> Iterator[Machine]:
    """The session's image provisioned by Ignition with a local user: from its first boot the
    machine's /etc/passwd is its own copy on STATE, which hides every later release's."""
    key = generate_key(tmp_path / LOCAL_USER).read_text().strip()
    config = tmp_path / "config.ign"
    config.write_text(
        json.dumps(
            {
                "ignition": {"version": "3.4.0"},
                "passwd": {"users": [{"name": LOCAL_USER, "sshAuthorizedKeys": [key]}]},
            }
        )
    )
    # Secure Boot enforced from the first start: the build's keys enrolled into the variable
    # store beforehand, as a cloud's custom signature database or a vendor's factory keys are.
    store = enrolled_vars(REPO / "keys/secureboot", tmp_path / "enrolled.fd")
    m = Machine(
        built_image,
        artifacts / "vm",
        fw_cfg=(("opt/org.berth/config", config),),
        firmware=Firmware.SECURE_BOOT,
        ovmf_vars=store,
        tpm=artifacts / "tpm",  # STATE sealed to it at first boot; 2.0.0 must unlock it
    )
    try:
        yield m
    finally:
        m.save_logs(artifacts)
        m.close()


def payload_size(release: BuildResult) -> int:
    return sum((release.output / name).stat().st_size for name in PAYLOAD_FILES)


def check_seeded(m: Machine, site: Site) -> int:
    """The update to 2.0.0 was seeded: nginx served its root and UKI by range requests only,
    what it sent for 2.0.0 is what the agent recorded as fetched, and far less than the payload.
    Returns the bytes fetched."""
    transfer = json.loads(m.ssh("cat /var/lib/berth/state.json"))["transfers"][-1]
    assert transfer["version"] == "2.0.0" and transfer["reused"] > 0, transfer
    served = [
        r
        for r in site.server.requests()
        if r.request.startswith("GET ") and "/targets/containerhost/2.0.0/" in r.path
    ]
    seeded = [r for r in served if r.path.endswith((".root.erofs", ".uki.efi"))]
    assert seeded and all(r.status == 206 and r.range for r in seeded), seeded
    assert {r.path.rsplit(".", 1)[1] for r in seeded} == {"erofs", "efi"}, seeded
    assert sum(r.body_bytes for r in served) == transfer["fetched"], (served, transfer)
    # The install's journal line was written in the boot before this one.
    journal = m.ssh("journalctl --no-pager -o cat -u berth-update")
    installed = [line for line in journal.splitlines() if "installed 2.0.0 into" in line]
    assert installed and "reused" in installed[-1], journal[-3000:]
    return int(transfer["fetched"])


def start_container(m: Machine, work: Path) -> None:
    """A container with restart policy `always`: podman-restart.service starts it at boot."""
    sleeper = static_binary(work, "sleeper", SLEEPER_C)
    archive = oci_archive({"sleeper": (sleeper, 0o755)}, ["/sleeper"], "berth/sleeper:1")
    m.vm.ssh("cat > /var/tmp/sleeper.tar", input=archive)
    m.ssh("podman load -q -i /var/tmp/sleeper.tar && rm /var/tmp/sleeper.tar", timeout=300)
    m.ssh("podman run -d --name sleeper --restart=always localhost/berth/sleeper:1", timeout=300)


def container_running(m: Machine) -> bool:
    out = m.try_ssh("podman inspect -f '{{.State.Running}}' sleeper")
    return out == "true"


def test_the_daemon_updates_skips_a_pulled_release_and_obeys_a_manual_rollback(
    provisioned_machine: Machine, releases: Releases, tmp_path: Path
) -> None:
    good, pulled = releases.good(), releases.panics()
    with Site(tmp_path / "site") as site:
        site.publish(good)
        site.publish(pulled)
        site.pull("3.0.0")  # published, then withdrawn before any machine installed it

        m = provisioned_machine
        m.start()
        assert m.version() == "1.0.0"
        assert "secure boot:  enabled (kernel lockdown: integrity)" in m.ssh("berth-update status")
        assert login_as(m.vm, LOCAL_USER, tmp_path / LOCAL_USER, "whoami") == LOCAL_USER
        assert m.ssh("test -f /var/lib/berth/etc/upper/passwd && echo local") == "local"
        m.ssh("echo kept > /etc/berth-e2e.conf && mkdir -p /var/lib/e2e")
        m.ssh("echo 'motd of this machine' > /etc/motd")
        m.ssh("echo data > /var/lib/e2e/file && sync")
        start_container(m, tmp_path)
        # A quadlet service whose named volume holds its page and a start counter.
        load_httpd_image(m.vm, tmp_path)
        install_web_service(m.vm, "served across updates")
        assert web_answers(m.vm) == "served across updates"
        starts = web_starts(m.vm)
        boot_id = m.vm.boot_id()

        # (1) The daemon finds 2.0.0, installs it and reboots into it.
        m.configure(site.guest_url)
        m.wait_for_boot("2.0.0", boot_id)
        m.wait_until_blessed("2.0.0")
        status = m.status()
        fetched = check_seeded(m, site)
        assert status["boot_entries"] == ["berth_2.0.0.efi", "berth_1.0.0.efi"], status
        roles = {s["version"]: s["state"] for s in status["slots"]}
        assert roles == {"2.0.0": "booted", "1.0.0": "previous"}, status
        assert m.ssh(f"cat {MARKER}") == "e2e 2.0.0"
        assert m.ssh("cat /etc/berth-e2e.conf") == "kept"
        assert m.ssh("cat /var/lib/e2e/file") == "data"
        m.wait_for("the container to run again", lambda: container_running(m), 300)
        assert web_answers(m.vm) == "served across updates"
        assert web_starts(m.vm) == starts + 1  # started once by the new boot, volume intact
        assert m.ssh("systemctl is-system-running --wait", timeout=300) == "running"
        assert status["secure_boot"] == "enabled", status  # 2.0.0's UKI ran under Secure Boot
        # 2.0.0, signed with the same PCR key, unlocked STATE on its first boot: no re-enrolment.
        assert (status["state_encrypted"], status["state_binding"]) == (True, "tpm2-pcr11-signed")
        # 2.0.0's package made its system user in a maintainer script and ships a log directory
        # in /var; on this machine, whose /etc/passwd and /var are its own, its service runs as
        # that user all the same, its log directory is there, and the local user logs in.
        assert m.ssh(f"systemctl is-active {NEW_PACKAGE}.service") == "active"
        uid = m.ssh(f"id -u {NEW_PACKAGE}")
        assert m.ssh(f"ps -o uid= -C {NEW_PACKAGE} | sort -u").split() == [uid]
        assert m.ssh(f"stat -c %U /var/log/{NEW_PACKAGE}") == NEW_PACKAGE
        assert login_as(m.vm, LOCAL_USER, tmp_path / LOCAL_USER, "whoami") == LOCAL_USER
        # The file both the operator and 2.0.0 changed: the local copy wins, and says so.
        assert status["etc_drift"] == [DRIFTING], status
        assert f"{DRIFTING}: changed on this machine and by 2.0.0" in m.journal("-u berth-update")
        record(
            f"2.0.0 adds {NEW_PACKAGE} (system user, service) on a provisioned 1.0.0",
            0,
            0,
            "service runs as its user; local user logs in",
        )
        # (2d) The pulled 3.0.0 was never installed.
        assert not any("3.0.0" in e for e in status["boot_entries"])
        assert all(s["version"] != "3.0.0" for s in status["slots"])
        record(
            "update 1.0.0 -> 2.0.0 by the daemon",
            m.boots(),
            m.seconds(),
            f"2.0.0 blessed; fetched {fetched / 1e6:.1f} of {payload_size(good) / 1e6:.1f} MB",
        )
        journal = m.ssh("journalctl --no-pager -o cat -u berth-update")
        assert "skipped 3.0.0: pulled" in journal, journal[-3000:]
        record("pulled release 3.0.0", 0, 0, "never installed")

        # (5) The operator rolls back; the daemon does not bring 2.0.0 back by itself. In the
        # same reboot, /etc/motd (changed on 1.0.0) goes back to the image's version.
        start = m.seconds()
        assert "1.0.0 boots next" in m.ssh("berth-update rollback")
        image_motd = m.ssh(
            "mkdir -p /run/e2e-root && mount --bind -o ro / /run/e2e-root && "
            "cat /run/e2e-root/etc/motd; umount /run/e2e-root"
        )
        assert m.ssh("cat /etc/motd") == "motd of this machine"
        assert "comes back at the next boot" in m.ssh("berth-update etc-revert /etc/motd")
        m.vm.reboot_and_wait(timeout=900)
        assert m.version() == "1.0.0"
        assert m.ssh("cat /etc/motd") == image_motd
        assert m.ssh("test -e /var/lib/berth/etc/upper/motd || echo gone") == "gone"
        m.ssh("systemctl restart berth-update.service")
        m.wait_for(
            "the daemon's next check",
            lambda: "skipped 2.0.0: marked bad" in m.journal("-u berth-update"),
            300,
        )
        status = m.status()
        assert status["pending"] is None
        assert any(b.startswith("2.0.0: rolled back by the operator") for b in status["bad"])
        assert status["boot_entries"][0] == "berth_1.0.0.efi"
        assert m.ssh("cat /etc/berth-e2e.conf") == "kept"
        m.wait_for("the container to run again", lambda: container_running(m), 300)
        assert web_answers(m.vm) == "served across updates"
        assert web_starts(m.vm) == starts + 2
        record("manual rollback to 1.0.0", 1, m.seconds() - start, "1.0.0 stays")

        plain = check_entry_renames_are_durable(m, tmp_path)
        record(
            "boot entry rename on vfat",
            0,
            0,
            f"complete on disk (a plain rename left {plain} bytes)",
        )


# Run in the guest on a FAT image attached to a loop device: what reaches the disk when the agent
# renames a boot entry, read back with O_DIRECT (which first writes out every dirty buffer of the
# device, so it shows what a power cut could leave once writeback has run, short of the inode).
FAT_RENAME = r"""
import mmap, os, struct, subprocess, sys
from pathlib import Path
from updater.disk import bootentries
from updater.files import fsync_dir

image, mount = sys.argv[1], Path("/run/berth-fat")
mount.mkdir(exist_ok=True)
loop = subprocess.run(["losetup", "-f", "--show", image], capture_output=True, text=True,
                      check=True).stdout.strip()
subprocess.run(["mount", "-t", "vfat", loop, mount], check=True)

def on_disk(short):
    fd = os.open(loop, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, os.lseek(fd, 0, os.SEEK_END))
    os.lseek(fd, 0, os.SEEK_SET)
    n = os.readv(fd, [buf])
    os.close(fd)
    sizes = [struct.unpack_from("<I", buf, off + 28)[0] for off in range(0, n, 32)
             if buf[off:off + 11] == short and buf[off + 11] == 0x20]
    return sizes[0] if sizes else None

def staged(name):
    path = mount / name
    with path.open("wb") as f:
        f.write(b"\0" * 300_000)
        f.flush()
        os.fsync(f.fileno())
    return path

try:
    # The kernel's own rename with a directory fsync: the control.
    plain = staged(".a.tmp")
    os.rename(plain, mount / "plain_1.0.0+3.efi")
    fsync_dir(mount)
    # The agent's rename.
    agent = staged(".b.tmp")
    bootentries._rename(agent, mount / "berth_2.0.0+3.efi")
    fsync_dir(mount)
    print(on_disk(b"PLAIN_~1EFI"), on_disk(b"BERTH_~1EFI"))
finally:
    subprocess.run(["umount", mount])
    subprocess.run(["losetup", "-d", loop])
"""


def check_entry_renames_are_durable(m: Machine, work: Path) -> str:
    """On the guest's own kernel: a boot entry the agent renamed has its size on disk at once.

    Linux's vfat creates the new name's directory entry without the file's size and first
    cluster and writes them only with the inode, so a power cut after a rename and a directory
    fsync left a zero-length UKI that systemd-boot could not load. Returns what the plain
    rename left, for the record."""
    image = make_vfat(work / "esp.img", "ESPTEST", {})
    m.vm.ssh("cat > /var/tmp/esp-test.img", input=image.read_bytes())
    out = m.vm.ssh("python3 - /var/tmp/esp-test.img", input=FAT_RENAME.encode())
    m.ssh("rm /var/tmp/esp-test.img")
    plain, agent = out.stdout.decode().split()
    assert agent == "300000", f"the renamed entry is {agent} bytes on disk, not 300000"
    return plain


HEALTH_HOOK = """#!/bin/sh
. /etc/os-release
if [ "$IMAGE_VERSION" = 4.0.0 ]; then
    echo "the e2e service does not answer on $IMAGE_VERSION"
    exit 1
fi
"""

REQUIRED_UNIT = """[Unit]
Description=A service the operator requires (fails on 4.0.0)

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c '. /etc/os-release; test "$IMAGE_VERSION" != 4.0.0'

[Install]
WantedBy=multi-user.target
"""


def check_secure_boot(m: Machine) -> None:
    """The first start enrolled the ESP's keys (setup mode); this boot is enforced and locked
    down, and every module the image loads was accepted under lockdown."""
    console = m.console()
    assert "Custom Secure Boot keys successfully enrolled" in console, console[-3000:]
    assert "Secure boot enabled" in console
    status = m.status()
    assert (status["secure_boot"], status["lockdown"]) == ("enabled", "integrity"), status
    assert m.ssh("systemctl is-system-running --wait", timeout=300) == "running"
    kernel = m.ssh("journalctl -k -b --no-pager -o cat")
    for refusal in ("Loading of unsigned module", "module verification failed", "Lockdown: "):
        lines = [line for line in kernel.splitlines() if refusal in line]
        # Lockdown's own notices name what it restricts; only hibernation may be among them.
        lines = [line for line in lines if "hibernation is restricted" not in line]
        assert not lines, lines
    modules = m.ssh("cut -d' ' -f1 /proc/modules").split()
    assert len(modules) > 10, modules  # the image's drivers were loaded, signatures and all


def check_state_sealed(m: Machine) -> None:
    """First boot with a TPM made STATE LUKS2, sealed to PCR 11 as signed by the build's key."""
    status = m.status()
    assert status["state_encrypted"] is True, status
    assert (status["state_binding"], status["tpm"]) == ("tpm2-pcr11-signed", "TPM 2.0")
    assert m.ssh("lsblk -no TYPE /dev/mapper/berth-state") == "crypt"
    # The recovery key first boot made: on the console once, nowhere in the journal.
    keys = re.findall(r"berth:\s+((?:[cbdefghijklnrtuv]{8}-){7}[cbdefghijklnrtuv]{8})", m.console())
    assert len(keys) == 1, m.console()[-3000:]
    assert keys[0] not in m.ssh("journalctl -b --no-pager -o cat")
    tokens = json.loads(m.ssh("cryptsetup luksDump --dump-json-metadata /dev/vda6"))["tokens"]
    assert sorted(t["type"] for t in tokens.values()) == ["systemd-recovery", "systemd-tpm2"]


def check_foreign_uki_never_runs(m: Machine, work: Path) -> None:
    """A UKI signed with another key, put on the ESP by hand as the newest entry with tries
    left: the firmware would refuse it and then stop at its menu, so before the reboot the
    agent sets it aside and 1.0.0 boots again."""
    from builder import signing
    from builder.publish import secureboot

    other = work / "other-keys"
    secureboot.init_secureboot_keys(other, owner="Someone Else")
    uki = (m.image.output / "uki.efi").read_bytes()
    foreign = signing.sign_image(
        uki, other / "secureboot/db.key", other / "secureboot/db.crt", "the foreign UKI"
    )
    m.vm.ssh("cat > /boot/EFI/Linux/berth_9.9.9+3.efi && sync", input=foreign)
    boot_id = m.vm.boot_id()
    m.vm.ssh("systemctl reboot", check=False, timeout=30)
    m.wait_for_boot("1.0.0", boot_id, timeout=900)
    names = m.ssh("ls /boot/EFI/Linux").split()
    assert "berth_9.9.9+3.efi.refused" in names and "berth_9.9.9+3.efi" not in names, names
    assert "Access denied" not in m.console()  # the firmware was never asked to load it
    journal = m.ssh("journalctl -b -1 --no-pager -o cat -u berth-boot-check")
    assert "set aside berth_9.9.9+3.efi: signed by CN=Someone Else Secure Boot db" in journal
    assert not any(b.startswith("9.9.9") for b in m.status()["bad"])  # never tried


def _bad(m: Machine, version: str) -> str:
    reasons = [b for b in m.status()["bad"] if b.startswith(f"{version}: ")]
    assert reasons, m.status()
    return str(reasons[0])


def test_bad_releases_roll_back_by_themselves(
    machine: Machine, releases: Releases, tmp_path: Path
) -> None:
    with Site(tmp_path / "site") as site:
        m = machine
        m.start()
        check_secure_boot(m)
        check_state_sealed(m)
        start, boots = m.seconds(), m.boots()
        check_foreign_uki_never_runs(m, tmp_path)
        record(
            "UKI signed by another key, by hand", m.boots() - boots, m.seconds() - start, "1.0.0"
        )
        m.ssh("mkdir -p /etc/berth/health.d")
        m.vm.ssh("cat > /etc/berth/health.d/50-e2e", input=HEALTH_HOOK.encode())
        m.vm.ssh("cat > /etc/systemd/system/e2e-required.service", input=REQUIRED_UNIT.encode())
        m.ssh("chmod 755 /etc/berth/health.d/50-e2e && systemctl enable --now e2e-required")
        m.ssh("sync")

        # (2a) A kernel that panics: three tries, then the boot loader falls back.
        site.publish(releases.panics())
        start, boots = m.seconds(), m.boots()
        boot_id = m.vm.boot_id()
        m.configure(site.guest_url)
        m.wait_for_boot("1.0.0", boot_id, timeout=1500)
        m.wait_for("the agent to judge the fallback", lambda: bool(_bad(m, "3.0.0")), 300)
        reason = _bad(m, "3.0.0")
        assert "rolled back from 3.0.0: boot did not complete" in reason
        assert m.status()["boot_entries"][0] == "berth_1.0.0.efi"
        assert "Kernel panic - not syncing" in m.console()
        record("bad release: kernel panics", m.boots() - boots, m.seconds() - start, "1.0.0")

        # (2c) A health check fails (an operator hook, a required unit): one try, then back.
        site.publish(releases.unhealthy())
        start, boots = m.seconds(), m.boots()
        boot_id = m.vm.boot_id()
        m.ssh("systemctl restart berth-update.service")
        m.wait_for_boot("1.0.0", boot_id, timeout=1500)
        m.wait_for("the fallback to be judged", lambda: bool(_bad(m, "4.0.0")), 300)
        reason = _bad(m, "4.0.0")
        assert "rolled back from 4.0.0: health check failed" in reason, reason
        assert "e2e-required.service" in reason and "does not answer on 4.0.0" in reason
        assert m.ssh("systemctl is-system-running --wait", timeout=300) == "running"
        record("bad release: health check fails", m.boots() - boots, m.seconds() - start, "1.0.0")

        # (2d) Signed with another PCR key: its initrd cannot unlock STATE, says why, and the
        # tries run out; 1.0.0 unlocks it again.
        site.publish(releases.other_pcr_key())
        start, boots = m.seconds(), m.boots()
        boot_id = m.vm.boot_id()
        # Its install reuses all but 0.3 MB and is over in seconds: no wait for our SSH session.
        m.configure(site.guest_url, reboot_delay="0s")
        m.wait_for_boot("1.0.0", boot_id, timeout=1500)
        m.wait_for("the fallback to be judged", lambda: bool(_bad(m, "5.0.0")), 300)
        reason = _bad(m, "5.0.0")
        assert "rolled back from 5.0.0: STATE could not be unlocked: this release's UKI is " in (
            reason
        ), reason
        assert "signed with another PCR key" in reason
        assert "STATE could not be unlocked" in m.console()
        assert m.status()["state_encrypted"] is True
        assert m.ssh("ls /sys/firmware/efi/efivars | grep -c BerthStateUnlock || true") == "0"
        record("bad release: other PCR key", m.boots() - boots, m.seconds() - start, "1.0.0")

        # (4) Bytes change in the installed, inactive slot: the daemon re-verifies it before
        # rebooting and refuses it.
        site.publish(releases.good())
        start, boots = m.seconds(), m.boots()
        m.configure(site.guest_url, strategy="off")
        m.wait_for("2.0.0 to be installed", lambda: m.status()["pending"] == "2.0.0", 900)
        tamper_inactive_slot(m)
        m.configure(site.guest_url, strategy="immediate")
        m.wait_for("the re-verification", lambda: bool(_bad(m, "2.0.0")), 600)
        assert "slot B changed after it was installed" in _bad(m, "2.0.0")
        assert m.version() == "1.0.0"
        assert not any("2.0.0" in e for e in m.entries())
        record("tampered inactive slot, daemon", m.boots() - boots, m.seconds() - start, "refused")

        # (2b) The same, but the operator reboots straight into it: dm-verity stops the boot
        # and the tries run out.
        start, boots = m.seconds(), m.boots()
        m.configure(site.guest_url, strategy="off")
        m.ssh("berth-update apply --version 2.0.0", timeout=1200)
        tamper_inactive_slot(m)
        boot_id = m.vm.boot_id()
        m.vm.ssh("systemctl reboot", check=False, timeout=30)
        m.wait_for_boot("1.0.0", boot_id, timeout=1500)
        m.wait_for("the fallback to be judged", lambda: bool(_bad(m, "2.0.0")), 300)
        assert "rolled back from 2.0.0: boot did not complete" in _bad(m, "2.0.0")
        assert re.search(r"device-mapper: verity: .*is corrupted", m.console())
        record("slot data != root hash, booted", m.boots() - boots, m.seconds() - start, "1.0.0")


TAMPER = """
import os, sys
from pathlib import Path
from typing import Any
from updater.disk import slots

disk = Path("/dev/vda")
with disk.open("rb") as f:
    slot = slots.read_slots(f)["AB".index(sys.argv[1])]
device = slots.partition_path(disk, slot.data_number)
fd = os.open(device, os.O_RDWR)
before = os.pread(fd, 16, 1024)  # the erofs superblock, read when the slot is mounted
os.pwrite(fd, bytes(b ^ 0xFF for b in before), 1024)
os.fsync(fd)
print(device)
"""


def tamper_inactive_slot(m: Machine) -> None:
    """Flip bytes in the erofs superblock of the slot that is not booted.

    The partition comes from the agent's own reading of the GPT: labels name versions, and
    udev's view of them is stale once the agent has rewritten the table of a disk in use."""
    slot = next(s for s in m.status()["slots"] if s["state"] != "booted")
    out = m.vm.ssh(f"python3 - {slot['name']}", input=TAMPER.encode())
    device = out.stdout.decode().strip()
    assert device.startswith("/dev/vda"), device


@dataclass(frozen=True)
class Phase:
    """A part of an update, recognised from the daemon's status (None: no SSH answer), and how
    long after reaching it the cut may come (a random point in [0, spread] seconds)."""

    name: str
    reached: Callable[[str | None], bool]
    spread: float


PHASES = (
    # The slot is being written: the stream of the root file system (resumed later by Range),
    # after its hash tree (a second at most: too short to aim at).
    Phase("download", lambda t: t is not None and "root.erofs" in t and "100%" not in t, 8),
    # The root is in: the tree built from its blocks is checked against the signed root hash
    # and the stored tree, and the slot is named after the root hash. That takes a moment, so
    # a poll that comes too late sees the UKI already streaming: the cut then lands there.
    Phase(
        "verify",
        lambda t: t is not None and ("root.erofs 100%" in t or "uki.efi" in t),
        2,
    ),
    # The UKI streams to a temporary name on the ESP, then the rename with a boot counter.
    Phase("UKI install", lambda t: t is not None and "uki.efi" in t, 2),
    # Shutting down, firmware, boot loader, kernel and the new version's trial boot.
    Phase("reboot", lambda t: t is None or t.startswith("installed"), 40),
)


def cut_in_phase(m: Machine, phase: Phase, rng: random.Random, timeout: float = 600) -> float:
    """Wait for `phase`, then cut the power at a random moment of it. Seconds waited after it
    was reached; raises PhaseMissed when the update got past it first."""
    deadline = m.seconds() + timeout
    while True:
        text = m.try_ssh("systemctl show -P StatusText berth-update.service")
        if phase.reached(text):
            break
        # try_ssh: the guest may go down for the reboot between the two questions.
        settled = text is not None and text.startswith(("idle", "on trial"))
        if settled and m.try_ssh(". /etc/os-release && echo $IMAGE_VERSION") == "2.0.0":
            raise PhaseMissed(phase.name)
        if m.seconds() > deadline:
            raise AssertionError(f"the update never reached {phase.name}; status {text!r}")
        time.sleep(0.5)
    offset = rng.uniform(0, phase.spread)
    time.sleep(offset)
    m.cut_power()
    return offset


class PhaseMissed(Exception):
    pass


SETTLED = (
    "state=$(systemctl is-system-running --wait); . /etc/os-release;"
    ' echo "$state $IMAGE_VERSION"; berth-update status --json'
)


def settle(m: Machine, timeout: float = 1500) -> tuple[str, str, dict[str, Any]]:
    """After a cut: the first boot that finishes starting up, on whichever version, with the
    system state, the version and the agent's status. The daemon may carry on with the update
    and reboot while this waits (a cut in the UKI install leaves a verified slot behind); a
    dropped connection just means waiting for the next boot."""
    deadline = m.seconds() + timeout
    while True:
        out = m.try_ssh(SETTLED, timeout=700)
        if out is not None:
            head, _, doc = out.partition("\n")
            state, _, version = head.partition(" ")
            return state, version, json.loads(doc)
        if m.seconds() > deadline:
            raise AssertionError(f"no boot finished within {timeout:.0f} s after the cut")
        m.vm.recover_hung_reset()
        time.sleep(2)


def _power_cuts(
    built_image: BuildResult, artifacts: Path, releases: Releases, tmp_path: Path, cuts: int
) -> None:
    """Cut the power in every phase of an update while 1.0.0 updates itself to 2.0.0.

    A chain starts from a fresh 1.0.0 machine and cuts once in each phase in turn (download,
    verify, UKI install, reboot), each at a random moment of that phase. After every cut the
    machine must come up fully on 1.0.0 or 2.0.0 and its agent state must be readable; the
    daemon then carries on, and the chain ends with 2.0.0 blessed. More cuts start new chains.
    """
    seed = int(os.environ.get("BERTH_POWER_SEED", str(random.randrange(1 << 32))))
    print(f"\npower-loss seed: {seed} (BERTH_POWER_SEED={seed} replays it)", flush=True)
    rng = random.Random(seed)
    # About 20 s for the root file system at 8 MB/s: a window wide enough to cut in.
    limit = "location /targets/ { limit_rate 8m; }"
    done, chain, boots, seconds = 0, 0, 0, 0.0
    outcomes: list[str] = []
    with Site(tmp_path / "site", limit) as site:
        site.publish(releases.good())
        while done < cuts:
            chain += 1
            m = Machine(built_image, artifacts / f"vm-{chain}")
            try:
                m.start()
                m.configure(site.guest_url)
                for phase in PHASES[: cuts - done]:
                    try:
                        offset = cut_in_phase(m, phase, rng)
                    except PhaseMissed:
                        print(f"chain {chain}: the update was done before {phase.name}")
                        break
                    done += 1
                    m.start(timeout=1500)
                    state, version, status = settle(m)
                    print(f"cut {done}: {phase.name} + {offset:.1f} s: booted {version}")
                    outcomes.append(f"{phase.name}->{version}")
                    assert version in ("1.0.0", "2.0.0"), version
                    assert state == "running", m.ssh("systemctl --failed --no-legend")
                    assert status["booted_version"] == version  # the state file survived
                m.wait_until_blessed("2.0.0", timeout=1500)
                assert m.ssh(f"cat {MARKER}") == "e2e 2.0.0"
                boots += m.boots()
                seconds += m.seconds()
            finally:
                m.save_logs(artifacts)
                m.close()
    ranged = sum(1 for r in site.server.requests() if r.range)
    outcome = f"2.0.0 blessed after cuts in {', '.join(outcomes)}; {ranged} range GETs"
    record(f"power loss x{cuts} (seed {seed})", boots, seconds, outcome)


def test_power_loss_during_an_update(
    built_image: BuildResult, artifacts: Path, releases: Releases, tmp_path: Path
) -> None:
    _power_cuts(built_image, artifacts, releases, tmp_path, POWER_CUTS)


@pytest.mark.slow
def test_power_loss_many_times(
    built_image: BuildResult, artifacts: Path, releases: Releases, tmp_path: Path
) -> None:
    _power_cuts(built_image, artifacts, releases, tmp_path, SLOW_POWER_CUTS)
