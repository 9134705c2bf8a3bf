"""Boot disk images under QEMU/OVMF for tests, benchmarks and `./build.py run`.

A `VM` owns a work directory holding everything that belongs to one machine: its copy-on-write
overlay (so the image under test stays pristine), its own copy of the UEFI variable store (boot
entries and boot counting must not leak between machines), the harness's SSH key, the serial log
and the QMP socket. The guest is reached over user-mode networking with port 22 forwarded to a free
local port; the SSH key goes in as the systemd credential `ssh.authorized_keys.root`.
With `VMConfig.tpm` the machine also gets a TPM 2.0 from swtpm (`SoftwareTPM`), whose state lives
in a directory of the caller's choosing so that it outlives QEMU, as a real machine's TPM does.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import functools
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from builder.errors import BuildError, ToolMissing
from builder.formats import image_info
from builder.log import log
from builder.run import find_tool, run
from qemu.ssh import generate_key, public_key_path, ssh_argv, write_ssh_config

# Built images live in out/ at the repository root, the parent of this package.
REPO_ROOT = Path(__file__).resolve().parent.parent

# Runs once per guest connection to a `guest_forwards` address; standard library only.
RELAY = Path(__file__).resolve().parent / "relay.py"
# QEMU's user-mode network when `net=` is not given.
DEFAULT_USER_NETWORK = ipaddress.IPv4Network("10.0.2.0/24")

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# OVMF built with Secure Boot and SMM: only SMM code may write the authenticated variables, so
# the guest OS cannot change db behind the firmware's back. Its empty variable store (OVMF_VARS)
# is setup mode: no PK, nothing enforced until keys are enrolled.
OVMF_CODE_SECBOOT = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")

SERIAL_TAIL_LINES = 40
# A guest kernel's last line before the machine resets; the firmware prints again seconds later.
RESET_LINE = "reboot: machine restart"
# How long the console may stay silent after RESET_LINE before the reset counts as hung.
RESET_SILENCE = 120.0
# Begins each line the harness itself writes into a serial log, so readers can tell it apart.
HARNESS_MARK = "berth-harness:"
# The AHCI controller has six ports, one disk each.
AHCI_PORTS = 6
# Unix socket paths are limited to 108 bytes; deep pytest tmp dirs can exceed that.
_MAX_SOCKET_PATH = 100
# swtpm creates its control socket within milliseconds of starting; this is the bound.
SWTPM_START_SECONDS = 10.0
SWTPM_STOP_SECONDS = 5.0
SWTPM_LOG_TAIL_LINES = 10

_ANSI_ESCAPE = re.compile(rb"\x1b(?:\[[0-9;:?=]*[A-Za-z]|[()][A-Za-z0-9]|[=>])")
_LINE_END = re.compile(r"\r+\n|\r")
_CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9_.@-]+")
_FW_CFG_NAME = re.compile(r"opt/[A-Za-z0-9_.\-/]+")


class DiskBus(enum.StrEnum):
    VIRTIO = "virtio"
    NVME = "nvme"
    SATA = "sata"


class Accel(enum.StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class Firmware(enum.StrEnum):
    UEFI = "uefi"
    # OVMF's Secure Boot build, with SMM; its variables decide whether it enforces.
    SECURE_BOOT = "secure-boot"


class VMError(BuildError):
    """The VM could not be set up, started or controlled."""


class BootError(VMError):
    """The guest did not reach the expected state; the message ends with the serial console tail."""


class SSHError(VMError):
    """A command run in the guest over SSH failed or timed out."""

    def __init__(self, message: str, returncode: int, stdout: bytes, stderr: bytes) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


@dataclass(frozen=True)
class VMConfig:
    disk: Path
    memory_mib: int = 2048
    cpus: int = 2
    disk_bus: DiskBus = DiskBus.VIRTIO
    extra_disks: tuple[Path, ...] = ()
    # (fw_cfg name, file), e.g. ("opt/org.berth/config", Path("config.ign")).
    fw_cfg: tuple[tuple[str, Path], ...] = ()
    # Extra systemd credentials (name, value), passed in SMBIOS type 11 strings.
    credentials: tuple[tuple[str, str], ...] = ()
    # Public keys authorized besides the harness's own, e.g. a developer's key for `./build.py run`.
    authorized_keys: tuple[str, ...] = ()
    # Boot a qcow2 overlay backed by `disk` instead of writing to `disk` itself.
    snapshot: bool = True
    # Virtual size for the overlay (qemu-img syntax, "8G"); with snapshot=False `disk` is resized.
    disk_size: str | None = None
    # Private key of the harness; generated in the work dir when None. `<key>.pub` must exist.
    ssh_key: Path | None = None
    ssh_port: int | None = None
    # More TCP forwards from 127.0.0.1 on the host to the guest: (host port, guest port).
    port_forwards: tuple[tuple[int, int], ...] = ()
    # Extra -smbios values, e.g. "type=1,manufacturer=Amazon EC2,product=t3.micro": what the
    # guest reads as its DMI strings (commas inside a value are written twice, as QEMU wants).
    smbios: tuple[str, ...] = ()
    # The user-mode network (QEMU's `net=`), e.g. "169.254.169.0/24"; None is QEMU's 10.0.2.0/24.
    # The gateway is its .2, DNS .3 and the guest gets .15 by DHCP, as in QEMU's default.
    user_network: str | None = None
    # (guest address, guest port, host port): a guest connecting to address:port reaches
    # 127.0.0.1:host port. The address must lie inside the user network (QEMU forwards nothing
    # else), so serving the metadata address 169.254.169.254 needs user_network 169.254.169.0/24.
    guest_forwards: tuple[tuple[str, int, int], ...] = ()
    accel: Accel = Accel.AUTO
    # Serial console on the terminal too (with the QEMU monitor: Ctrl-A X quits, Ctrl-A C monitor).
    interactive: bool = False
    # Make a guest reboot end QEMU; off by default because update tests reboot the machine.
    no_reboot: bool = False
    # Defaults to a temporary directory that is removed on close().
    work_dir: Path | None = None
    serial_log: Path | None = None
    firmware: Firmware = Firmware.UEFI
    # The firmware's code; None is the one `firmware` names.
    ovmf_code: Path | None = None
    # The variable store the machine starts from (copied): enrolled keys, say
    # (qemu/secureboot.py); the default is OVMF's empty one (setup mode under SECURE_BOOT).
    ovmf_vars: Path = OVMF_VARS
    # A TPM 2.0 (swtpm) whose state is kept in this directory, created when missing. The state
    # outlives QEMU, so a power cycle or a later VM with the same directory finds the same TPM
    # (its seeds, so keys sealed to it still unseal); a new empty directory is a new TPM.
    tpm: Path | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def firmware_code(self) -> Path:
        if self.ovmf_code is not None:
            return self.ovmf_code
        return OVMF_CODE_SECBOOT if self.firmware is Firmware.SECURE_BOOT else OVMF_CODE


def _qemu_escape(value: str | os.PathLike[str]) -> str:
    """Escape a value inside a QEMU `key=value,...` option, where a comma is written twice."""
    return os.fspath(value).replace(",", ",,")


# How long the KVM probe lets the firmware run before it must have printed something. OVMF
# under working KVM prints within a second or two; under TCG it takes 6-25 s, so a probe that
# timed out only means "use TCG", the safe answer.
KVM_PROBE_SECONDS = 10


@functools.cache
def kvm_usable() -> bool:
    """Whether QEMU can really run a KVM guest here, probed once per process."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    if not (OVMF_CODE.is_file() and OVMF_VARS.is_file()):
        return False
    # /dev/kvm may exist and answer ioctls while the host still refuses to run a vCPU: nested
    # or restricted hosts fail setting MSRs at CPU reset (QEMU aborts), or let the vCPU start
    # and then stop it in the firmware's first instructions with "KVM internal error ...
    # emulation failure" (QEMU then sits paused and silent). Only running the firmware we
    # boot with tells them apart, so the probe does that and waits for its first words.
    with tempfile.TemporaryDirectory(prefix="berth-kvm-probe-") as tmp:
        vars_copy = Path(tmp) / "vars.fd"
        shutil.copyfile(OVMF_VARS, vars_copy)
        result = run(
            [
                "timeout",
                str(KVM_PROBE_SECONDS),
                find_tool("qemu-system-x86_64"),
                *("-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "256"),
                *("-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio"),
                "-drive",
                f"if=pflash,format=raw,unit=0,readonly=on,file={_qemu_escape(OVMF_CODE)}",
                "-drive",
                f"if=pflash,format=raw,unit=1,file={_qemu_escape(vars_copy)}",
            ],
            check=False,
            quiet=True,
        )
    return kvm_probe_passed(result.stdout, result.stderr)


def kvm_probe_passed(console: bytes, errors: bytes) -> bool:
    """The probe's verdict: the firmware printed, and KVM reported no internal error."""
    return b"KVM internal error" not in errors and bool(console.strip())


def finalize_accel(accel: Accel) -> Accel:
    if accel is Accel.AUTO:
        return Accel.KVM if kvm_usable() else Accel.TCG
    return accel


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (QEMU binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def image_format(path: Path) -> str:
    return str(image_info(path)["format"])


def smbios_credential(name: str, value: bytes) -> str:
    """The `-smbios` argument handing systemd credential `name`, base64: nothing to escape."""
    if not _CREDENTIAL_NAME.fullmatch(name):
        raise VMError(f"invalid systemd credential name: {name!r}")
    encoded = base64.b64encode(value).decode()
    return f"type=11,value=io.systemd.credential.binary:{name}={encoded}"


def fw_cfg_argument(name: str, file: Path) -> str:
    # Names outside opt/ belong to QEMU and the firmware; QEMU merely warns about them.
    if not _FW_CFG_NAME.fullmatch(name):
        raise VMError(f"fw_cfg name must look like opt/<vendor>/<name>: {name!r}")
    return f"name={name},file={_qemu_escape(file.resolve())}"


def user_network_options(network: str | None) -> tuple[ipaddress.IPv4Network, list[str]]:
    """The network and its `-nic user` options (`net=`, `host=`, `dns=`, `dhcpstart=`)."""
    if network is None:
        return DEFAULT_USER_NETWORK, []
    try:
        net = ipaddress.IPv4Network(network)
    except ValueError as e:
        raise VMError(f"user_network {network!r} is not an IPv4 network: {e}") from None
    # slirp's DHCP server hands out 16 addresses from dhcpstart (.15 to .30).
    if not 4 <= net.prefixlen <= 27:
        raise VMError(
            f"user_network {network!r}: the prefix must be /4 to /27, to hold the gateway (.2), "
            "DNS (.3) and the DHCP range (.15 to .30)"
        )
    return net, [f"net={net}", f"host={net[2]}", f"dns={net[3]}", f"dhcpstart={net[15]}"]


def guest_forward_option(
    address: str, port: int, host_port: int, network: ipaddress.IPv4Network
) -> str:
    """`guestfwd=` running relay.py for each connection the guest opens to address:port.

    The `cmd:` form starts one relay per connection with the connection on its stdin and stdout;
    a chardev target would carry a single connection for the whole life of the VM.
    """
    where = f"guest forward {address}:{port}"
    try:
        addr = ipaddress.IPv4Address(address)
    except ValueError:
        raise VMError(f"{where}: {address!r} is not an IPv4 address") from None
    if addr not in network:
        raise VMError(
            f"{where}: the address is outside the user network {network}, and QEMU forwards only "
            "addresses inside it",
            hint="set VMConfig.user_network to a network holding the address, "
            "e.g. 169.254.169.0/24 for 169.254.169.254",
        )
    # slirp refuses its own gateway and DNS addresses; the others would shadow the guest.
    reserved = {
        network.network_address: "the network address",
        network.broadcast_address: "the broadcast address",
        network[2]: "the gateway",
        network[3]: "the DNS server",
        network[15]: "the guest's own address",
    }
    if addr in reserved:
        raise VMError(f"{where}: the address is {reserved[addr]} of the user network {network}")
    for what, value in (("guest port", port), ("host port", host_port)):
        if not 1 <= value <= 65535:
            raise VMError(f"{where}: {what} {value} is not a TCP port")
    command = shlex.join([sys.executable, str(RELAY), "127.0.0.1", str(host_port)])
    return f"guestfwd=tcp:{addr}:{port}-cmd:{_qemu_escape(command)}"


def nic_argument(config: VMConfig, ssh_port: int) -> str:
    """The `-nic user,...` value: SSH and the other host forwards, the network, guest forwards."""
    network, options = user_network_options(config.user_network)
    seen: set[tuple[str, int]] = set()
    for address, port, host_port in config.guest_forwards:
        if (address, port) in seen:
            raise VMError(f"guest forward {address}:{port} is given twice")
        seen.add((address, port))
        options.append(guest_forward_option(address, port, host_port, network))
    return (
        f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{ssh_port}-:22"
        + "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in config.port_forwards)
        + "".join(f",{option}" for option in options)
    )


class SoftwareTPM:
    """One machine's TPM 2.0: `swtpm socket` with its state in `state_dir`.

    QEMU connects to the control socket (`socket`, by default in `work_dir`) and hands swtpm its
    data channel over it; with `--terminate` swtpm ends when QEMU goes away. stop() ends and reaps
    it in any case. swtpm writes the state (`tpm2-00.permall`, the seeds) when the TPM is first
    initialized, not when it starts, and keeps it across starts.
    """

    def __init__(self, state_dir: Path, work_dir: Path, socket: Path | None = None) -> None:
        self.state_dir = state_dir
        self.socket = socket or work_dir / "swtpm.sock"
        self.log = work_dir / "swtpm.log"
        self._proc: subprocess.Popen[bytes] | None = None
        # Where this start's lines begin in the log, which earlier starts' lines precede.
        self._log_start = 0

    def command(self) -> list[str]:
        # swtpm's options have no escape for a comma inside a value.
        for path in (self.state_dir, self.socket, self.log):
            if "," in os.fspath(path):
                raise VMError(f"swtpm cannot take a path with a comma: {path}")
        return [
            find_tool("swtpm"),
            *("socket", "--tpm2"),
            *("--tpmstate", f"dir={self.state_dir.resolve()}"),
            *("--ctrl", f"type=unixio,path={self.socket.resolve()}"),
            *("--log", f"file={self.log.resolve()},level=1"),
            "--terminate",
        ]

    def qemu_arguments(self) -> list[str]:
        """What QEMU needs to attach this TPM: the socket, the emulator backend, a CRB device."""
        return [
            *("-chardev", f"socket,id=chrtpm,path={_qemu_escape(self.socket.resolve())}"),
            *("-tpmdev", "emulator,id=tpm0,chardev=chrtpm"),
            *("-device", "tpm-crb,tpmdev=tpm0"),
        ]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self, timeout: float = SWTPM_START_SECONDS) -> None:
        """Start swtpm and wait until its control socket exists, for QEMU to connect to."""
        if self.running:
            raise VMError("swtpm is already running")
        argv = self.command()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        # A socket left by a swtpm that was killed: QEMU must not find it before the new one.
        self.socket.unlink(missing_ok=True)
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as output:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not self._listening():
            status = self._proc.poll()
            if status is not None:
                self._proc = None
                raise VMError(
                    f"swtpm exited with status {status} before creating {self.socket}"
                    + self._log_tail()
                )
            if time.monotonic() > deadline:
                self.stop()
                raise VMError(
                    f"swtpm did not create {self.socket} within {timeout:.0f}s" + self._log_tail()
                )
            time.sleep(0.05)

    def _listening(self) -> bool:
        """Whether the control socket accepts connections: swtpm creates the file (bind) a
        moment before it listens, and a QEMU that connects in between fails to start. The probe
        connection is closed at once; swtpm then waits for the next one (QEMU's)."""
        if not self.socket.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(os.fspath(self.socket))
            except OSError:
                return False
        return True

    def stop(self) -> int | None:
        """End swtpm if it still runs and reap it; its exit status, None if it was not started."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(SWTPM_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait()

    def _log_tail(self) -> str:
        try:
            with self.log.open("rb") as f:
                f.seek(self._log_start)
                text = f.read().decode(errors="replace").strip()
        except FileNotFoundError:
            return ""
        if not text:
            return ""
        tail = "\n".join(text.splitlines()[-SWTPM_LOG_TAIL_LINES:])
        return f"\n--- swtpm log ({self.log}) ---\n{tail}"


def disk_arguments(index: int, path: Path, fmt: str, bus: DiskBus, *, boot: bool) -> list[str]:
    """-drive/-device arguments for disk `index` on `bus`; the boot disk is the firmware's first."""
    drive_id = f"disk{index}"
    args = [
        "-drive",
        f"if=none,id={drive_id},format={fmt},file={_qemu_escape(path)},discard=unmap",
    ]
    bootindex = ",bootindex=1" if boot else ""
    # A serial gives the guest stable /dev/disk/by-id names.
    serial = f"berth{index}"
    match bus:
        case DiskBus.VIRTIO:
            device = f"virtio-blk-pci,drive={drive_id},serial={serial}{bootindex}"
        case DiskBus.NVME:
            device = f"nvme,drive={drive_id},serial={serial}{bootindex}"
        case DiskBus.SATA:
            if index >= AHCI_PORTS:
                raise VMError(f"at most {AHCI_PORTS} disks fit on the SATA controller")
            device = f"ide-hd,drive={drive_id},bus=ahci.{index},serial={serial}{bootindex}"
    return [*args, "-device", device]


def resolve_disk(image: str, root: Path = REPO_ROOT) -> Path:
    """An existing file is the disk itself; anything else names an image built under out/."""
    path = Path(image)
    if path.is_file():
        return path
    if "/" not in image:
        latest = root / "out" / image / "latest"
        for candidate in (latest / "disk.qcow2", latest / "disk.raw"):
            if candidate.is_file():
                return candidate
        raise VMError(
            f"no disk image for '{image}': neither {latest}/disk.qcow2 nor disk.raw exists",
            hint=f"build the image '{image}' first, or pass the path of a disk image",
        )
    raise VMError(f"disk image not found: {image}")


def strip_ansi(data: bytes) -> str:
    text = _ANSI_ESCAPE.sub(b"", data).decode(errors="replace")
    # A lone carriage return redraws the line (countdowns); a log reads better with each kept.
    return _LINE_END.sub("\n", text)


class VM:
    """One QEMU machine. Use as a context manager: QEMU is started on entry and always stopped."""

    def __init__(self, config: VMConfig) -> None:
        self.config = config
        self._own_work_dir = config.work_dir is None
        self.work_dir = config.work_dir or Path(tempfile.mkdtemp(prefix="berth-vm-"))
        self.serial_log = config.serial_log or self.work_dir / "serial.log"
        self.qemu_log = self.work_dir / "qemu.log"
        self.ssh_key = config.ssh_key or self.work_dir / "id_ed25519"
        self.ssh_config = self.work_dir / "ssh_config"
        self.ssh_port = config.ssh_port or 0
        self.vars_file = self.work_dir / "OVMF_VARS.fd"
        self._socket_dir: Path | None = None
        self.qmp_socket = self.work_dir / "qmp.sock"
        self.tpm_socket = self.work_dir / "swtpm.sock"
        # The machine's swtpm, set up by prepare() when the config asks for a TPM.
        self.tpm: SoftwareTPM | None = None
        self.accel = Accel.TCG
        # Seconds from QEMU start (or from the reboot request) until SSH answered.
        self.boot_seconds: float | None = None
        self._disk = config.disk
        self._disk_format = "raw"
        self._extra_formats: list[str] = []
        self._prepared = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._serial_start = 0
        self._ssh_answered = False

    # Lifecycle

    def __enter__(self) -> VM:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def prepare(self) -> None:
        """Create the work dir contents once; later starts (power cycles) reuse disk and NVRAM."""
        if self._prepared:
            return
        config = self.config
        for firmware in (config.firmware_code, config.ovmf_vars):
            if not firmware.is_file():
                raise ToolMissing(
                    f"UEFI firmware {firmware} not found", hint="apt-get install ovmf"
                )
        if not config.disk.is_file():
            raise VMError(f"disk image not found: {config.disk}")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if max(len(os.fspath(s)) for s in (self.qmp_socket, self.tpm_socket)) > _MAX_SOCKET_PATH:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="berth-qmp-"))
            self.qmp_socket = self._socket_dir / "qmp.sock"
            self.tpm_socket = self._socket_dir / "swtpm.sock"
        if config.tpm is not None:
            self.tpm = SoftwareTPM(config.tpm, self.work_dir, socket=self.tpm_socket)

        disk = config.disk.resolve()
        info = image_info(disk)
        fmt = str(info["format"])
        if config.snapshot:
            overlay = self.work_dir / "overlay.qcow2"
            size = [config.disk_size] if config.disk_size else []
            run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-b", disk, "-F", fmt, overlay, *size],
                quiet=True,
            )
            # qemu-img accepts an overlay smaller than its backing file; the guest would see a
            # truncated GPT, so refuse instead.
            if image_info(overlay)["virtual-size"] < info["virtual-size"]:
                raise VMError(
                    f"disk size {config.disk_size} is smaller than the image "
                    f"({info['virtual-size']} bytes)"
                )
            self._disk, self._disk_format = overlay, "qcow2"
        else:
            if config.disk_size:
                run(["qemu-img", "resize", "-q", "-f", fmt, disk, config.disk_size], quiet=True)
            self._disk, self._disk_format = disk, fmt
        self._extra_formats = [image_format(extra) for extra in config.extra_disks]

        shutil.copyfile(config.ovmf_vars, self.vars_file)
        if config.ssh_key is None:
            if not self.ssh_key.exists():
                generate_key(self.ssh_key)
        elif not public_key_path(self.ssh_key).is_file():
            raise VMError(f"public key {public_key_path(self.ssh_key)} not found")
        if not self.ssh_port:
            self.ssh_port = free_port()
        write_ssh_config(self.ssh_config, port=self.ssh_port, identity=self.ssh_key.resolve())
        self.accel = finalize_accel(config.accel)
        self._prepared = True

    def command(self) -> list[str]:
        """The QEMU command line; prepare() must have run."""
        if not self._prepared:
            raise VMError("VM.command() needs VM.prepare() first")
        config = self.config
        secure = config.firmware is Firmware.SECURE_BOOT
        argv = [
            find_tool("qemu-system-x86_64"),
            # The Secure Boot firmware keeps its variable store in SMM-only flash.
            *("-machine", "q35,smm=on" if secure else "q35"),
            *("-accel", str(self.accel)),
            # "max" is everything TCG can emulate; "host" is the only sensible KVM model.
            *("-cpu", "host" if self.accel is Accel.KVM else "max"),
            *("-smp", str(config.cpus)),
            *("-m", str(config.memory_mib)),
            *("-nodefaults", "-no-user-config", "-display", "none"),
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={_qemu_escape(config.firmware_code)}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={_qemu_escape(self.vars_file.resolve())}",
            *(("-global", "driver=cfi.pflash01,property=secure,value=on") if secure else ()),
            *("-nic", nic_argument(config, self.ssh_port)),
            # Early-boot entropy: without it TCG guests can stall in getrandom().
            *("-device", "virtio-rng-pci"),
            *("-qmp", f"unix:{_qemu_escape(self.qmp_socket)},server=on,wait=off"),
        ]
        log_path = _qemu_escape(self.serial_log.resolve())
        if config.interactive:
            # One chardev muxes serial console and monitor on the terminal and logs the console.
            argv += [
                "-chardev",
                f"stdio,id=console,mux=on,signal=off,logfile={log_path},logappend=on",
                *("-serial", "chardev:console", "-mon", "chardev=console,mode=readline"),
            ]
        else:
            # append: a power cycle (kill + start) keeps the earlier boots' console for diagnosis.
            argv += [
                *("-chardev", f"file,id=console,path={log_path},append=on"),
                *("-serial", "chardev:console"),
            ]
        if config.disk_bus is DiskBus.SATA:
            argv += ["-device", "ahci,id=ahci"]
        argv += disk_arguments(0, self._disk, self._disk_format, config.disk_bus, boot=True)
        for index, (extra, fmt) in enumerate(
            zip(config.extra_disks, self._extra_formats, strict=True), start=1
        ):
            argv += disk_arguments(index, extra.resolve(), fmt, config.disk_bus, boot=False)
        for name, file in config.fw_cfg:
            argv += ["-fw_cfg", fw_cfg_argument(name, file)]
        for name, value in self.credentials():
            argv += ["-smbios", smbios_credential(name, value)]
        for table in config.smbios:
            argv += ["-smbios", table]
        if self.tpm is not None:
            argv += self.tpm.qemu_arguments()
        if config.no_reboot:
            argv.append("-no-reboot")
        argv += config.extra_args
        return argv

    def credentials(self) -> list[tuple[str, bytes]]:
        keys = [public_key_path(self.ssh_key).read_text().strip(), *self.config.authorized_keys]
        authorized = "".join(f"{key.strip()}\n" for key in keys)
        creds = [("ssh.authorized_keys.root", authorized.encode())]
        creds += [(name, value.encode()) for name, value in self.config.credentials]
        return creds

    def start(self) -> None:
        """Start QEMU without waiting for the guest; start again after kill() to power-cycle."""
        if self.running:
            raise VMError("the VM is already running")
        self.prepare()
        argv = self.command()
        self._serial_start = self.serial_offset()
        self._ssh_answered = False
        self.boot_seconds = None
        self.qmp_socket.unlink(missing_ok=True)
        log(f"starting VM ({self.accel}, ssh port {self.ssh_port}, work dir {self.work_dir})")
        if self.tpm is not None:
            # A power cycle: the last QEMU's swtpm has ended by itself (--terminate) or ends
            # now; the new one starts from the same state, as a machine's TPM keeps power off.
            self.tpm.stop()
            self.tpm.start()
        self._started_at = time.monotonic()
        try:
            if self.config.interactive:
                self._proc = subprocess.Popen(argv)
            else:
                with self.qemu_log.open("ab") as output:
                    self._proc = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
                    )
        except BaseException:
            self._stop_tpm()
            raise

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """QEMU's process id, once started (a power cycle starts a new process)."""
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def wait_exit(self, timeout: float | None = None) -> int:
        """Wait for QEMU to end (poweroff, `SuccessAction=exit`); return its exit status."""
        proc = self._require_proc()
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self._boot_error(f"QEMU was still running after {timeout:.0f}s") from None
        self._stop_tpm()
        return status

    @property
    def disk(self) -> Path:
        """The disk QEMU writes: the overlay when `snapshot`, else the configured disk."""
        return self._disk

    def shutdown(self, timeout: float = 120.0) -> int:
        """Power off cleanly (systemctl over SSH, else ACPI power button); kill after `timeout`."""
        proc = self._require_proc()
        if proc.poll() is not None:
            self._stop_tpm()
            return proc.returncode
        asked = False
        if self._ssh_answered:
            result = self._ssh_run("systemctl poweroff", timeout=30)
            # 255 is either the connection dropping as poweroff began or ssh failing; the power
            # button below is harmless in the first case and needed in the second.
            asked = result.returncode == 0
        if not asked:
            with contextlib.suppress(VMError):
                self.qmp("system_powerdown")
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"VM did not power off within {timeout:.0f}s, killing it")
            return self.kill()
        self._stop_tpm()
        return status

    def kill(self) -> int:
        """Pull the plug: SIGKILL QEMU, so nothing the guest did not flush reaches the disk."""
        proc = self._require_proc()
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        status = proc.wait()
        self._stop_tpm()
        return status

    def recover_hung_reset(self, silence: float = RESET_SILENCE) -> bool:
        """Power-cycle a machine that went silent after a reset, as a BMC's watchdog would.

        Under TCG a warm reset can leave the firmware printing nothing at all (once in a CI run:
        over 20 minutes of silence after "reboot: machine restart" with QEMU alive, though systemd
        had armed the guest's 10-minute watchdog for the reboot). Only this case is handled:
        the console's last words are the kernel's reset and nothing followed for `silence`
        seconds, so the firmware never handed over to the boot loader and no boot counter
        moved. A boot that hangs later, in our own code, is left for the test to fail. The console
        gets a line saying what was done; return whether it was.
        """
        if not self.running:
            return False
        try:
            quiet = time.time() - self.serial_log.stat().st_mtime
        except FileNotFoundError:
            return False
        last_words = self.serial_text(max(0, self.serial_offset() - 512)).rstrip()
        if quiet < silence or not last_words.endswith(RESET_LINE):
            return False
        self.kill()
        with self.serial_log.open("a") as console:
            console.write(
                f"\n{HARNESS_MARK} no console output for {quiet:.0f} s after the guest reset;"
                " power-cycled the machine\n"
            )
        log(f"the firmware was silent {quiet:.0f} s after a reset: power-cycling the VM")
        self.start()
        return True

    def close(self) -> None:
        if self.running:
            self.kill()
        self._stop_tpm()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    # Serial console

    def serial_offset(self) -> int:
        """Current size of the serial log: pass as `since=` to look only at what comes next."""
        try:
            return self.serial_log.stat().st_size
        except FileNotFoundError:
            return 0

    def serial_text(self, since: int = 0) -> str:
        """The serial log from byte `since` on, without terminal escape sequences."""
        try:
            with self.serial_log.open("rb") as f:
                f.seek(since)
                return strip_ansi(f.read())
        except FileNotFoundError:
            return ""

    def serial_tail(self, lines: int = SERIAL_TAIL_LINES) -> str:
        return "\n".join(self.serial_text().splitlines()[-lines:])

    def wait_for_serial(
        self, pattern: str | re.Pattern[str], timeout: float = 300.0, since: int | None = None
    ) -> str:
        """Wait until the console shows `pattern` (since this start by default); return the match.

        Raises BootError when QEMU exits first or the timeout passes.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        offset = self._serial_start if since is None else since
        deadline = time.monotonic() + timeout
        while True:
            self.recover_hung_reset()
            # Read before checking for exit so the last words of a dying QEMU are not missed.
            exited = not self.running
            match = regex.search(self.serial_text(offset))
            if match:
                return match.group(0)
            if exited:
                raise self._boot_error(f"QEMU exited before the console showed /{regex.pattern}/")
            if time.monotonic() > deadline:
                raise self._boot_error(
                    f"the console did not show /{regex.pattern}/ within {timeout:.0f}s"
                )
            time.sleep(0.5)

    # SSH

    def wait_for_ssh(self, timeout: float = 300.0) -> float:
        """Wait until root can log in over SSH; return (and record) seconds since QEMU started."""
        deadline = time.monotonic() + timeout
        last = b""
        while True:
            self._require_running("QEMU exited before SSH answered")
            self.recover_hung_reset()
            result = self._ssh_run("true", timeout=30, connect_timeout=5)
            if result.returncode == 0:
                self._ssh_answered = True
                self.boot_seconds = time.monotonic() - self._started_at
                return self.boot_seconds
            last = result.stderr.strip() or last
            if time.monotonic() > deadline:
                detail = f" (last ssh error: {last.decode(errors='replace')})" if last else ""
                raise self._boot_error(f"SSH did not answer within {timeout:.0f}s{detail}")
            time.sleep(1)

    def ssh(
        self,
        command: str,
        *,
        check: bool = True,
        timeout: float = 120.0,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a shell command in the guest as root; output is captured."""
        self._require_running("QEMU is not running")
        start = time.monotonic()
        result = self._ssh_run(command, timeout=timeout, input=input)
        if time.monotonic() - start >= timeout:
            raise SSHError(
                f"ssh command timed out after {timeout:.0f}s: {command}",
                result.returncode,
                result.stdout,
                result.stderr,
            )
        if check and result.returncode != 0:
            stderr = result.stderr.decode(errors="replace").strip()
            raise SSHError(
                f"ssh command failed with exit status {result.returncode}: {command}"
                + (f"\n{stderr}" if stderr else ""),
                result.returncode,
                result.stdout,
                result.stderr,
            )
        return result

    def ssh_output(self, command: str, *, timeout: float = 120.0) -> str:
        """Stdout of a guest command that must succeed, without surrounding whitespace."""
        return self.ssh(command, timeout=timeout).stdout.decode(errors="replace").strip()

    def ssh_command(self) -> list[str]:
        """The command line that logs in to this VM."""
        return ssh_argv(self.ssh_config, self.ssh_port)

    def boot_id(self) -> str:
        return self.ssh_output("cat /proc/sys/kernel/random/boot_id")

    def reboot_and_wait(self, timeout: float = 300.0) -> float:
        """Reboot the guest and wait until it answers SSH with a new boot id; return the seconds."""
        old = self.boot_id()
        start = time.monotonic()
        self._ssh_run("systemctl reboot", timeout=30)
        deadline = start + timeout
        while True:
            self._require_running("QEMU exited during the reboot")
            self.recover_hung_reset()
            result = self._ssh_run(
                "cat /proc/sys/kernel/random/boot_id", timeout=30, connect_timeout=5
            )
            new = result.stdout.decode(errors="replace").strip()
            if result.returncode == 0 and new and new != old:
                self.boot_seconds = time.monotonic() - start
                return self.boot_seconds
            if time.monotonic() > deadline:
                raise self._boot_error(f"the guest did not come back within {timeout:.0f}s")
            time.sleep(1)

    def testinfra_host(self) -> Any:
        """A testinfra Host for the guest over the harness's ssh_config."""
        import testinfra

        # No ControlMaster: a master connection to the previous boot would outlive a reboot.
        return testinfra.get_host(
            f"ssh://root@127.0.0.1:{self.ssh_port}",
            ssh_config=str(self.ssh_config),
            controlpersist=0,
        )

    # QMP

    def qmp(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0
    ) -> Any:
        """Run one QMP command and return its result."""
        deadline = time.monotonic() + timeout
        while True:
            self._require_running("QEMU is not running")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(os.fspath(self.qmp_socket))
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                # QEMU creates the socket a moment after it starts.
                if time.monotonic() > deadline:
                    raise VMError(f"cannot connect to QMP at {self.qmp_socket}: {e}") from e
                time.sleep(0.1)
        with sock, sock.makefile("rwb") as stream:
            try:
                stream.readline()  # greeting
                _qmp_exchange(stream, {"execute": "qmp_capabilities"})
                request: dict[str, Any] = {"execute": command}
                if arguments:
                    request["arguments"] = arguments
                return _qmp_exchange(stream, request)
            except OSError as e:
                raise VMError(f"QMP command {command} failed: {e}") from e

    # Internals

    def _require_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise VMError("the VM was never started")
        return self._proc

    def _stop_tpm(self) -> None:
        if self.tpm is not None:
            self.tpm.stop()

    def _require_running(self, reason: str) -> None:
        if not self.running:
            raise self._boot_error(reason)

    def _ssh_run(
        self,
        command: str,
        *,
        timeout: float,
        connect_timeout: int | None = None,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        # coreutils timeout, because a guest that freezes mid-command would otherwise hang us.
        argv = [
            *("timeout", "--kill-after=5", f"{timeout:g}"),
            *ssh_argv(self.ssh_config, self.ssh_port, command, connect_timeout=connect_timeout),
        ]
        return run(argv, check=False, capture=True, input=input)

    def _boot_error(self, reason: str) -> BootError:
        status = self.returncode
        if status is not None:
            reason += f" (QEMU exit status {status})"
        parts = [reason]
        if not self.config.interactive and self.qemu_log.exists():
            qemu_output = self.qemu_log.read_text(errors="replace").strip()
            if qemu_output:
                parts.append("--- QEMU output ---\n" + "\n".join(qemu_output.splitlines()[-10:]))
        parts.append(
            f"--- last {SERIAL_TAIL_LINES} lines of the serial console ({self.serial_log}) ---\n"
            + self.serial_tail()
        )
        return BootError("\n".join(parts))


def _qmp_exchange(stream: Any, request: dict[str, Any]) -> Any:
    stream.write(json.dumps(request).encode() + b"\n")
    stream.flush()
    while True:
        line = stream.readline()
        if not line:
            raise VMError(f"QEMU closed QMP during {request['execute']}")
        reply = json.loads(line)
        if "error" in reply:
            raise VMError(f"QMP {request['execute']}: {reply['error'].get('desc', reply['error'])}")
        if "return" in reply:
            return reply["return"]
        # Anything else is an asynchronous event.
