"""The VM harness's software TPM without booting: QEMU's arguments, and a real swtpm started,
initialized over its control socket as QEMU would, and stopped.

A boot with the TPM attached is a VM test; here swtpm runs alone, in milliseconds.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from pathlib import Path

import pytest

from qemu.__main__ import tpm_beside_disk
from qemu.vm import SoftwareTPM, VMError
from tests.support.vms import option_values, prepared_vm

# swtpm's control channel (swtpm_ioctl(8), QEMU's tpm_emulator): a command code, big-endian,
# then its arguments; CMD_INIT's is a flags word. The answer starts with a TPM result code.
CMD_INIT = 2


def initialize(tpm: SoftwareTPM) -> None:
    """What QEMU does first on the control socket: CMD_INIT, which loads or makes the state."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
        control.settimeout(10)
        control.connect(os.fspath(tpm.socket))
        control.sendall(struct.pack(">II", CMD_INIT, 0))
        (result,) = struct.unpack(">I", control.recv(4))
    assert result == 0


def seeds(state_dir: Path) -> str:
    """The digest of the TPM's permanent state: its seeds, NV and hierarchy settings."""
    return hashlib.sha256((state_dir / "tpm2-00.permall").read_bytes()).hexdigest()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def tpm(tmp_path: Path) -> SoftwareTPM:
    return SoftwareTPM(tmp_path / "state", tmp_path / "work")


def test_qemu_gets_the_tpm_exactly_when_the_config_has_one(tmp_path: Path, blank: Path) -> None:
    plain = prepared_vm(tmp_path / "plain", blank).command()
    assert "-tpmdev" not in plain
    assert not any(value.startswith("tpm-") for value in option_values(plain, "-device"))
    assert not any("chrtpm" in value for value in option_values(plain, "-chardev"))

    vm = prepared_vm(tmp_path / "tpm", blank, tpm=tmp_path / "state")
    argv = vm.command()
    socket_path = tmp_path / "tpm/vm/swtpm.sock"
    assert option_values(argv, "-chardev")[-1] == f"socket,id=chrtpm,path={socket_path}"
    assert option_values(argv, "-tpmdev") == ["emulator,id=tpm0,chardev=chrtpm"]
    assert "tpm-crb,tpmdev=tpm0" in option_values(argv, "-device")
    # Only start() runs swtpm; preparing the machine does not even make the state directory.
    assert vm.tpm is not None and vm.tpm.pid is None
    assert not (tmp_path / "state").exists()


def test_swtpm_is_started_with_its_state_socket_and_log(tpm: SoftwareTPM, tmp_path: Path) -> None:
    argv = tpm.command()
    assert argv[0].endswith("/swtpm")
    assert option_values(argv, "--tpmstate") == [f"dir={tmp_path}/state"]
    assert option_values(argv, "--ctrl") == [f"type=unixio,path={tmp_path}/work/swtpm.sock"]
    assert option_values(argv, "--log") == [f"file={tmp_path}/work/swtpm.log,level=1"]
    assert {"socket", "--tpm2", "--terminate"} <= set(argv)


def test_a_long_work_dir_moves_the_socket_beside_qmp(tmp_path: Path, blank: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    vm = prepared_vm(deep, blank, tpm=tmp_path / "state")
    assert vm.tpm is not None
    assert vm.tpm.socket.parent == vm.qmp_socket.parent != vm.work_dir
    assert len(os.fspath(vm.tpm.socket)) < 100
    vm.close()


def test_started_tpm_has_its_socket_and_stopping_leaves_no_process(tpm: SoftwareTPM) -> None:
    tpm.start()
    pid = tpm.pid
    assert pid is not None and tpm.running
    assert tpm.socket.is_socket()
    # swtpm writes no state until the TPM is first initialized.
    assert not (tpm.state_dir / "tpm2-00.permall").exists()
    assert tpm.stop() is not None
    assert not tpm.running and gone(pid)
    assert not tpm.socket.exists()
    assert tpm.stop() is None  # stopping twice is harmless


def test_the_state_outlives_swtpm_and_a_fresh_directory_is_a_fresh_tpm(
    tpm: SoftwareTPM, tmp_path: Path
) -> None:
    tpm.start()
    initialize(tpm)
    first = seeds(tpm.state_dir)
    tpm.stop()
    # A power cycle: the same directory, the same TPM.
    tpm.start()
    initialize(tpm)
    assert seeds(tpm.state_dir) == first
    tpm.stop()
    other = SoftwareTPM(tmp_path / "new-state", tmp_path / "work")
    other.start()
    initialize(other)
    assert seeds(other.state_dir) != first
    other.stop()


def test_swtpm_dying_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    # A socket path in a directory that does not exist: swtpm cannot listen and exits.
    tpm = SoftwareTPM(tmp_path / "state", tmp_path / "work", socket=tmp_path / "no/such.sock")
    with pytest.raises(VMError, match=r"swtpm exited with status 1") as err:
        tpm.start()
    assert "Could not open UnixIO socket" in str(err.value)
    assert not tpm.running


def test_swtpm_refuses_paths_with_commas(tmp_path: Path) -> None:
    with pytest.raises(VMError, match="comma"):
        SoftwareTPM(tmp_path / "a,b", tmp_path).command()


def test_run_keeps_a_bare_tpm_with_the_disk(tmp_path: Path) -> None:
    disk = tmp_path / "out/disk.qcow2"
    assert tpm_beside_disk(disk, True, tmp_path / "vm") == tmp_path / "vm/tpm"
    assert tpm_beside_disk(disk, False, tmp_path / "vm") == tmp_path / "out/disk.qcow2.tpm"
