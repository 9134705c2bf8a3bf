"""STATE sealed to the TPM (swtpm): encrypted at first boot, unlocked on every boot without a
prompt, never unlocked by another TPM, and readable on the host with the recovery key that
provisioning supplied (the key first boot makes otherwise: tests/vm/test_updates_vm.py).

One machine, three boots (first boot, a reboot, the same disk with a fresh TPM until it gives
up); the image is the session's, whose `encrypt` is "auto". Machines without a TPM (every other
VM test) keep a plain STATE: tests/vm/test_image_vm.py checks that.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.errors import BuildError
from builder.image import BuildResult
from builder.run import run
from qemu import VM, VMConfig
from tests.support.e2e import Machine, record
from tests.support.luks import decrypt_volume

RECOVERY_KEY = re.compile(r"berth:\s+((?:[cbdefghijklnrtuv]{8}-){7}[cbdefghijklnrtuv]{8})")
MARKER = "/var/lib/berth-e2e-sealed"
SECRET = "e2e-secret-sealed-to-this-tpm"
# The recovery key provisioning supplies (a systemd credential) instead of one first boot makes.
SUPPLIED_KEY = "e2e recovery passphrase from provisioning 0123456789"


@pytest.fixture
def sealed_machine(built_image: BuildResult, artifacts: Path) -> Iterator[Machine]:
    m = Machine(
        built_image,
        artifacts / "vm",
        tpm=artifacts / "tpm",
        credentials=(("berth.state.recovery-key", SUPPLIED_KEY),),
    )
    try:
        yield m
    finally:
        m.save_logs(artifacts)
        m.close()


def _luks_tokens(m: Machine) -> list[str]:
    dump = json.loads(m.ssh("cryptsetup luksDump --dump-json-metadata /dev/vda6"))
    return sorted(token["type"] for token in dump["tokens"].values())


def _read_on_host(disk: Path, key: str, work: Path, path: str) -> str:
    """`path` inside the disk's STATE, opened on the host with `key` and read by debugfs."""
    raw = work / "disk.raw"
    run(["qemu-img", "convert", "-O", "raw", disk, raw])
    table = json.loads(run(["sfdisk", "--json", raw], capture=True).stdout)
    (state,) = [p for p in table["partitiontable"]["partitions"] if p.get("name") == "STATE"]
    loop = (
        run(
            [
                "losetup",
                "--find",
                "--show",
                "--read-only",
                f"--offset={state['start'] * 512}",
                f"--sizelimit={state['size'] * 512}",
                raw,
            ],
            capture=True,
        )
        .stdout.decode()
        .strip()
    )
    plain = work / "state.plain"
    try:
        # cryptsetup checks the key and gives the volume key; no device-mapper on the host.
        with pytest.raises(BuildError, match="No key available with this passphrase"):
            decrypt_volume(Path(loop), "not-the-recovery-key", plain)
        decrypt_volume(Path(loop), key, plain)
        return run(["debugfs", "-R", f"cat {path}", plain], capture=True).stdout.decode()
    finally:
        run(["losetup", "--detach", loop])
        raw.unlink()
        plain.unlink(missing_ok=True)


def test_state_is_sealed_to_the_tpm_and_opens_only_with_it_or_the_recovery_key(
    sealed_machine: Machine, artifacts: Path, tmp_path: Path
) -> None:
    m = sealed_machine
    m.start()
    # First boot: STATE became LUKS2 with a TPM2 token and a passphrase, before /var was used.
    status = m.status()
    assert status["state_encrypted"] is True, status
    assert status["state_binding"] == "tpm2-pcr11-signed"
    assert status["tpm"] == "TPM 2.0"
    assert status["state_encryption"].startswith("LUKS2, unlocked by the TPM: PCR 11")
    assert _luks_tokens(m) == ["systemd-tpm2"]  # the supplied key is a plain passphrase slot
    keyslots = json.loads(m.ssh("cryptsetup luksDump --dump-json-metadata /dev/vda6"))["keyslots"]
    assert len(keyslots) == 2, keyslots  # TPM2 and the supplied key; the first-boot key wiped
    dump = m.ssh("cryptsetup luksDump /dev/vda6")
    assert re.search(r"^Version:\s+2$", dump, re.M), dump
    metadata = json.loads(m.ssh("cryptsetup luksDump --dump-json-metadata /dev/vda6"))
    tpm2 = next(t for t in metadata["tokens"].values() if t["type"] == "systemd-tpm2")
    assert tpm2["tpm2_pubkey_pcrs"] == [11] and tpm2["tpm2-pcrs"] == []
    assert m.ssh("lsblk -no TYPE,MOUNTPOINT /dev/mapper/berth-state").split()[:2] == [
        "crypt",
        "/var",
    ]
    # Still grown to the disk, and /root and /home are on it too.
    assert int(m.ssh("findmnt -bno SIZE /var")) > 2 * 1024**3
    assert "berth-state" in m.ssh("findmnt -no SOURCE /root")
    assert m.ssh("systemctl is-system-running --wait", timeout=300) == "running"
    # Provisioning supplied the recovery key: enrolled, nothing made or shown, not in the
    # journal (the machine with a key made at first boot is tests/vm/test_updates_vm.py's).
    assert "STATE's recovery key is the one provisioning supplied" in m.console()
    assert not RECOVERY_KEY.findall(m.console())
    assert SUPPLIED_KEY not in m.ssh("journalctl -b --no-pager -o cat")
    recovery = SUPPLIED_KEY
    # A secret sealed to this TPM by systemd-creds, as provisioning would store one.
    m.ssh(
        f"mkdir -p /etc/credstore.encrypted && echo -n {SECRET} | systemd-creds encrypt "
        "--with-key=tpm2 --name=e2e - /etc/credstore.encrypted/e2e"
    )
    m.ssh(f"echo sealed > {MARKER} && sync")

    # A reboot: unlocked by the TPM, no prompt; the secret still decrypts.
    start, boots = m.seconds(), m.boots()
    assert m.vm.reboot_and_wait(timeout=600) > 0
    assert m.ssh(f"cat {MARKER}") == "sealed"
    assert m.ssh("systemd-creds decrypt --name=e2e /etc/credstore.encrypted/e2e -") == SECRET
    state = json.loads(m.ssh("cat /run/berth/state.json"))
    assert (state["encrypted"], state["encrypted_this_boot"]) == (True, False)
    assert "Please enter passphrase" not in m.console()
    record("sealed STATE: reboot unlocks", m.boots() - boots, m.seconds() - start, "unlocked")
    m.vm.shutdown()
    disk = m.vm.disk

    # The same disk with another (fresh) TPM: STATE never unlocks, no login is reached.
    start = time.monotonic()
    work = tmp_path / "other-tpm"
    with VM(
        VMConfig(
            disk=disk,
            work_dir=work,
            serial_log=artifacts / "other-tpm-serial.log",
            tpm=tmp_path / "fresh-tpm",
        )
    ) as other:
        other.wait_for_serial(
            r"STATE could not be unlocked: the TPM refused to unseal", timeout=600
        )
        other.wait_for_serial(r"rebooting in 10 s", timeout=120)
        text = other.serial_text()
        assert "login:" not in text
        assert other.ssh("true", check=False, timeout=20).returncode != 0
    record("sealed STATE: another TPM", 1, time.monotonic() - start, "refused")

    # The recovery key opens it on the host, and the data is there.
    assert _read_on_host(disk, recovery, tmp_path, MARKER.removeprefix("/var")) == "sealed\n"
