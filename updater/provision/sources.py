"""Which platform this machine runs on, and where its first-boot config (the "user data") is.

`detect_platform` answers from the kernel command line (`berth.platform=`, or CoreOS's
`ignition.platform.id=`) and otherwise from the firmware's DMI strings, the way Afterburn and
cloud-init's ds-identify do. `find_user_data` then looks in the places that platform offers, in a
fixed order, and returns the first config it finds with a `source` naming where it came from:

| platform | sources, in order |
| --- | --- |
| qemu | fw_cfg `opt/org.berth/config`, `opt/com.coreos/config`; then the drives below |
| every platform | a NoCloud drive (label `cidata`), an OpenStack config drive (label `config-2`) |
| ec2 | IMDSv2 `/latest/user-data` |
| gce | `/computeMetadata/v1/instance/attributes/user-data` |
| azure | `CustomData` in `ovf-env.xml` on the provisioning CD; IMDS `userData` |
| vmware | guestinfo `ignition.config.data`, `userdata` (with their `.encoding`) |
| openstack | the metadata service's `/openstack/latest/user_data` |

`find_platform_keys` reads the SSH key pair the machine was launched with (EC2 IMDSv2
`public-keys`, GCE `ssh-keys` of instance and project, Azure IMDS `publicKeys`), for the admin
account `core`, whether or not there is user data.

A metadata service may not answer yet at first boot (the network is still coming up), so it is
asked again with backoff for `SourceEnv.metadata_wait` seconds; one that never answers is an error,
because the platform promised it. Nothing found anywhere is not an error: the machine boots
unprovisioned (`None`). Everything the host provides is injectable through `SourceEnv`, so tests run
against directories, scripts and HTTP servers on 127.0.0.1.

Runs on the image: standard library, python3-requests and python3-yaml (both imported lazily).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import datetime
import json
import logging
import re
import tempfile
import time
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from updater import run
from updater.errors import CommandError, CommandTimeout, ToolMissing
from updater.provision import http
from updater.provision.plan import NotGzip, ProvisionError, check_strings, field_error, gunzip

log = logging.getLogger(__name__)


class Platform(StrEnum):
    QEMU = "qemu"
    EC2 = "ec2"
    GCE = "gce"
    AZURE = "azure"
    VMWARE = "vmware"
    OPENSTACK = "openstack"
    METAL = "metal"  # bare metal, or anything not recognised


# Ignition's platform ids for the platforms Berth knows, so a CoreOS-style command line works too.
IGNITION_PLATFORMS: Mapping[str, Platform] = {
    "qemu": Platform.QEMU,
    "aws": Platform.EC2,
    "gcp": Platform.GCE,
    "azure": Platform.AZURE,
    "vmware": Platform.VMWARE,
    "openstack": Platform.OPENSTACK,
    "metal": Platform.METAL,
}

DMI_DIR = Path("/sys/class/dmi/id")
DMI_FIELDS = (
    "sys_vendor",
    "product_name",
    "bios_vendor",
    "bios_version",
    "chassis_asset_tag",
    "board_vendor",
)
# Every Azure VM carries this chassis asset tag; plain Hyper-V does not.
AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"
OPENSTACK_PRODUCTS = ("OpenStack Nova", "OpenStack Compute")

FW_CFG_DIR = Path("/sys/firmware/qemu_fw_cfg/by_name")
FW_CFG_NAMES = ("opt/org.berth/config", "opt/com.coreos/config")
METADATA_URL = "http://169.254.169.254"
NOCLOUD_LABELS = ("cidata", "CIDATA")
CONFIG_DRIVE_LABELS = ("config-2", "CONFIG-2")
VMWARE_KEYS = ("ignition.config.data", "userdata")
EC2_TOKEN_TTL = "21600"

# Clouds cap user data at 16-256 KiB; anything near this is not a config but a runaway answer
# (or a drive's file, fw_cfg blob or --check FILE of any size): refused, not read whole.
MAX_USER_DATA = 16 << 20


# Platform detection


def kernel_arguments(cmdline: str) -> list[tuple[str, str | None]]:
    """`name=value` pairs of a kernel command line, with the kernel's double-quote grouping."""
    words: list[str] = []
    current: list[str] = []
    quoted = False
    started = False
    for char in cmdline:
        if char == '"':
            quoted = not quoted
            started = True
        elif char.isspace() and not quoted:
            if started:
                words.append("".join(current))
            current, started = [], False
        else:
            current.append(char)
            started = True
    if started:
        words.append("".join(current))
    pairs: list[tuple[str, str | None]] = []
    for word in words:
        name, sep, value = word.partition("=")
        pairs.append((name, value if sep else None))
    return pairs


def platform_from_cmdline(cmdline: str) -> Platform | None:
    """The platform the command line declares, or None; a name Berth does not know is an error.

    `berth.platform=` wins over `ignition.platform.id=`; of several, the last counts (as for every
    kernel and systemd argument).
    """
    berth: str | None = None
    ignition: str | None = None
    for name, value in kernel_arguments(cmdline):
        if name == "berth.platform":
            berth = value or ""
        elif name == "ignition.platform.id":
            ignition = value or ""
    if berth is not None:
        with contextlib.suppress(ValueError):
            return Platform(berth)
        raise ProvisionError(
            f"kernel command line: berth.platform={berth}: unknown platform; expected one of "
            + ", ".join(Platform)
        )
    if ignition is not None:
        if ignition in IGNITION_PLATFORMS:
            return IGNITION_PLATFORMS[ignition]
        raise ProvisionError(
            f"kernel command line: ignition.platform.id={ignition}: not a platform Berth supports; "
            "expected one of " + ", ".join(IGNITION_PLATFORMS)
        )
    return None


def read_dmi(dmi: Path = DMI_DIR) -> dict[str, str]:
    """The DMI strings Berth looks at; a missing or unreadable one is empty."""
    values: dict[str, str] = {}
    for name in DMI_FIELDS:
        try:
            values[name] = (dmi / name).read_text(errors="replace").strip()
        except OSError:
            values[name] = ""
    return values


def platform_from_dmi(dmi: Mapping[str, str]) -> Platform:
    vendor = dmi.get("sys_vendor", "")
    product = dmi.get("product_name", "")
    asset_tag = dmi.get("chassis_asset_tag", "")
    # Clouds first: their hypervisors are often KVM, and a cloud's guest must not pass for QEMU.
    if vendor == "Microsoft Corporation" and asset_tag == AZURE_ASSET_TAG:
        return Platform.AZURE
    # Nitro instances name Amazon; Xen-based ones only in the BIOS version ("4.11.amazon").
    if vendor == "Amazon EC2" or "amazon" in dmi.get("bios_version", "").lower():
        return Platform.EC2
    if vendor == "Google" or product == "Google Compute Engine":
        return Platform.GCE
    if vendor == "VMware, Inc.":
        return Platform.VMWARE
    if product in OPENSTACK_PRODUCTS or asset_tag in OPENSTACK_PRODUCTS:
        return Platform.OPENSTACK
    if vendor == "QEMU" or product.startswith("QEMU"):
        return Platform.QEMU
    return Platform.METAL


def detect_platform(cmdline: str, dmi: Path = DMI_DIR) -> Platform:
    """The platform: as declared on the kernel command line, else as the DMI strings show."""
    declared = platform_from_cmdline(cmdline)
    if declared is not None:
        return declared
    return platform_from_dmi(read_dmi(dmi))


# What a source returns


@dataclass(frozen=True)
class UserData:
    """One config as found, not yet parsed."""

    data: bytes
    source: str  # for messages: "NoCloud drive /dev/vdb user-data"
    # What the source says about the machine: "local-hostname", "instance-id" when it says so.
    meta: Mapping[str, str] = field(default_factory=dict, hash=False)
    notes: tuple[str, ...] = ()  # things the search noticed, worth showing on the console


# The host's side: drives and commands


class Drives(ABC):
    """Finds file systems by label or type and mounts them read-only (tests use directories)."""

    @abstractmethod
    def find(self, *, label: str | None = None, fstype: str | None = None) -> list[str]:
        """Devices whose file system has this label (exactly) or this type."""

    @abstractmethod
    def mount(self, device: str, fstypes: Sequence[str]) -> contextlib.AbstractContextManager[Path]:
        """Mount `device` read-only for the `with` block; it is unmounted whatever happens."""


@dataclass(frozen=True)
class SystemDrives(Drives):
    """The real thing: util-linux's blkid, mount and umount."""

    mount_root: Path = Path("/run")
    timeout: float = 60.0
    # Probe only these devices (or image files); empty: every block device, as blkid does.
    candidates: tuple[str, ...] = ()

    def find(self, *, label: str | None = None, fstype: str | None = None) -> list[str]:
        token = f"LABEL={label}" if label is not None else f"TYPE={fstype}"
        # -c /dev/null: probe the devices now; a cache from an earlier boot may be stale.
        argv = ["blkid", "-c", "/dev/null", "-o", "device", "-t", token, *self.candidates]
        result = _run_tool(argv, "looking for config drives", self.timeout)
        if result.returncode == 2:  # blkid: nothing matched
            return []
        if result.returncode != 0:
            raise _tool_failed("looking for config drives", argv, result)
        return [line for line in result.stdout.decode(errors="replace").splitlines() if line]

    @contextlib.contextmanager
    def mount(self, device: str, fstypes: Sequence[str]) -> Iterator[Path]:
        what = f"mounting {device}"
        target = Path(tempfile.mkdtemp(prefix="berth-config-", dir=self.mount_root))
        try:
            argv = [
                *("mount", "-o", "ro,nosuid,nodev,noexec", "-t", ",".join(fstypes)),
                *(device, str(target)),
            ]
            result = _run_tool(argv, what, self.timeout)
            if result.returncode != 0:
                raise _tool_failed(what, argv, result)
            try:
                yield target
            finally:
                self._unmount(device, target)
        finally:
            with contextlib.suppress(OSError):
                target.rmdir()

    def _unmount(self, device: str, target: Path) -> None:
        argv = ["umount", str(target)]
        result = _run_tool(argv, f"unmounting {device}", self.timeout)
        if result.returncode == 0:
            return
        # Something still holds it open: detach it anyway so the config drive is not left mounted.
        lazy = _run_tool(["umount", "--lazy", str(target)], f"unmounting {device}", self.timeout)
        if lazy.returncode != 0:
            raise _tool_failed(f"unmounting {device}", argv, result)


def _run_tool(argv: Sequence[str], what: str, timeout: float) -> run.Completed:
    try:
        return run.run(argv, timeout=timeout, check=False)
    except ToolMissing:
        raise ProvisionError(f"{what}: {argv[0]} is not installed") from None
    except CommandTimeout:
        raise ProvisionError(f"{what}: {argv[0]} did not finish within {timeout:g} s") from None
    except CommandError as e:
        raise ProvisionError(f"{what}: {e}") from None


def _tool_failed(what: str, argv: Sequence[str], result: run.Completed) -> ProvisionError:
    detail = result.stderr.decode(errors="replace").strip()
    return ProvisionError(
        f"{what}: {' '.join(argv)} failed with exit status {result.returncode}"
        + (f": {detail}" if detail else "")
    )


@dataclass(frozen=True)
class SourceEnv:
    """Where the sources look; the defaults are a real machine's, tests point them elsewhere."""

    fw_cfg_dir: Path = FW_CFG_DIR
    metadata_url: str = METADATA_URL  # EC2, GCE, Azure and OpenStack all answer here
    drives: Drives = field(default_factory=SystemDrives)
    # Seconds to keep asking a metadata service that does not answer (network still coming up).
    metadata_wait: float = 120.0
    request_timeout: float = 10.0  # one HTTP answer, once connected
    command_timeout: float = 30.0
    # Loads the fw_cfg sysfs driver when its directory is missing.
    modprobe: tuple[str, ...] = ("modprobe", "qemu_fw_cfg")
    rpctool: str = "vmware-rpctool"  # open-vm-tools


DEFAULT_ENV = SourceEnv()

_Source = Callable[[SourceEnv, list[str]], UserData | None]


def find_user_data(platform: Platform, *, env: SourceEnv = DEFAULT_ENV) -> UserData | None:
    """The first config this platform offers, or None when there is none anywhere.

    A source that is present but broken (a drive that does not mount, a metadata service that
    never answers or answers nonsense) raises ProvisionError: the boot stops rather than going on
    without the config the operator gave. When nothing is found, the search's notes are logged as
    warnings; when something is, they travel in `UserData.notes`.
    """
    notes: list[str] = []
    for source in _SOURCES[platform]:
        found = source(env, notes)
        if found is not None:
            return dataclasses.replace(found, notes=(*notes, *found.notes))
    for note in notes:
        log.warning("%s", note)
    return None


# QEMU fw_cfg


def _fw_cfg(env: SourceEnv, notes: list[str]) -> UserData | None:
    if not env.fw_cfg_dir.is_dir():
        _load_fw_cfg_driver(env)
        if not env.fw_cfg_dir.is_dir():
            notes.append(
                f"QEMU fw_cfg: {env.fw_cfg_dir} is missing even with qemu_fw_cfg loaded; "
                "the machine has no fw_cfg device"
            )
            return None
    for name in FW_CFG_NAMES:
        raw = env.fw_cfg_dir / name / "raw"
        source = f"QEMU fw_cfg {name}"
        try:
            data = read_config_file(raw, source)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise ProvisionError(f"{source}: cannot read {raw}: {e.strerror}") from None
        if data:
            return UserData(data, source)
        notes.append(f"{source} is empty, ignored")
    return None


def _load_fw_cfg_driver(env: SourceEnv) -> None:
    what = "QEMU fw_cfg: loading the qemu_fw_cfg kernel module"
    result = _run_tool(env.modprobe, what, env.command_timeout)
    if result.returncode != 0:
        raise _tool_failed(what, env.modprobe, result)


# Config drives (every platform)


def _one_drive(env: SourceEnv, labels: Sequence[str], kind: str, notes: list[str]) -> str | None:
    devices: list[str] = []
    for label in labels:
        devices += [d for d in env.drives.find(label=label) if d not in devices]
    if len(devices) > 1:
        notes.append(f"several {kind} drives ({', '.join(devices)}); using {devices[0]}")
    return devices[0] if devices else None


def read_config_file(path: Path, source: str) -> bytes:
    """A config file's bytes, refused past MAX_USER_DATA without reading the rest: a drive (or a
    `--check` of /dev/zero) can hold any amount. OSError as from open and read."""
    with path.open("rb") as f:
        data = f.read(MAX_USER_DATA + 1)
    if len(data) > MAX_USER_DATA:
        raise field_error(source, path.name, f"a config of at most {MAX_USER_DATA >> 20} MiB")
    return data


def _read_optional(path: Path, source: str) -> bytes | None:
    try:
        return read_config_file(path, source)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ProvisionError(f"{source}: cannot read {path.name}: {e.strerror}") from None


def _meta_value(source: str, key: str, value: object) -> str:
    # YAML reads `instance-id: 1234` as a number; it is still an id.
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise field_error(source, key, "a string", value)


def parse_nocloud_meta(text: bytes, source: str) -> dict[str, str]:
    """`local-hostname` and `instance-id` from NoCloud meta-data (YAML; JSON is YAML too)."""
    from updater.provision.cloudconfig import load_yaml

    doc = load_yaml(text, source)
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise field_error(source, "(document)", "a mapping", doc)
    return {
        key: _meta_value(source, key, doc[key])
        for key in ("local-hostname", "instance-id")
        if doc.get(key) is not None
    }


def parse_openstack_meta(text: bytes, source: str) -> dict[str, str]:
    """meta_data.json's `hostname` and `uuid`, under NoCloud's names."""
    try:
        doc = json.loads(text)
    except ValueError as e:  # not UTF-8 included
        raise ProvisionError(f"{source}: not valid JSON: {e}") from None
    except RecursionError:
        raise ProvisionError(f"{source}: not valid JSON: nested too deeply") from None
    check_strings(source, doc)
    if not isinstance(doc, dict):
        raise field_error(source, "(document)", "a JSON object", doc)
    meta: dict[str, str] = {}
    for key, ours in (("hostname", "local-hostname"), ("uuid", "instance-id")):
        if doc.get(key) is not None:
            meta[ours] = _meta_value(source, key, doc[key])
    return meta


def _nocloud(env: SourceEnv, notes: list[str]) -> UserData | None:
    device = _one_drive(env, NOCLOUD_LABELS, "NoCloud (cidata)", notes)
    if device is None:
        return None
    where = f"NoCloud drive {device}"
    with env.drives.mount(device, ("vfat", "iso9660")) as root:
        data = _read_optional(root / "user-data", where)
        meta_text = _read_optional(root / "meta-data", where)
    if data is None:
        notes.append(f"{where} has no user-data file")
        return None
    meta = parse_nocloud_meta(meta_text, f"{where} meta-data") if meta_text else {}
    return _non_empty(data, f"{where} user-data", notes, meta)


def _config_drive(env: SourceEnv, notes: list[str]) -> UserData | None:
    device = _one_drive(env, CONFIG_DRIVE_LABELS, "config-2", notes)
    if device is None:
        return None
    where = f"OpenStack config drive {device}"
    with env.drives.mount(device, ("vfat", "iso9660")) as root:
        latest = root / "openstack" / "latest"
        data = _read_optional(latest / "user_data", where)
        meta_text = _read_optional(latest / "meta_data.json", where)
    if data is None:
        notes.append(f"{where} has no openstack/latest/user_data")
        return None
    meta = {}
    if meta_text is not None:
        meta = parse_openstack_meta(meta_text, f"{where} openstack/latest/meta_data.json")
    return _non_empty(data, f"{where} openstack/latest/user_data", notes, meta)


def _non_empty(
    data: bytes, source: str, notes: list[str], meta: Mapping[str, str] | None = None
) -> UserData | None:
    if not data.strip():
        notes.append(f"{source} is empty, ignored")
        return None
    return UserData(data, source, dict(meta or {}))


# Metadata services


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    headers: Mapping[str, str]


def _request(
    env: SourceEnv,
    service: str,
    method: str,
    path: str,
    headers: Mapping[str, str],
) -> _Reply:
    """One metadata request: retried until it is answered, for up to `env.metadata_wait` s.

    2xx and 404 are answers; 5xx, refused connections and timeouts are "not yet"; any other
    status is an error naming the URL.
    """
    import requests

    base = env.metadata_url.rstrip("/")
    url = base + path
    deadline = time.monotonic() + env.metadata_wait

    def attempt() -> _Reply:
        remaining = max(deadline - time.monotonic(), 0.1)
        with (
            http.request_errors(f"{method} {url}", service),
            session.request(
                method,
                url,
                headers=dict(headers),
                timeout=(min(http.CONNECT_TIMEOUT, remaining), env.request_timeout),
                allow_redirects=False,
                stream=True,
            ) as response,
        ):
            status = response.status_code
            answer = f"{method} {url} answered HTTP {status} {response.reason or ''}"
            if status >= 500:
                raise http.NotYet(answer.rstrip())
            if not (200 <= status < 300 or status == 404):
                raise ProvisionError(f"{service}: {answer.rstrip()}")
            body = http.read_capped(response, MAX_USER_DATA)
            if body is None:
                raise ProvisionError(f"{url}: answer larger than {MAX_USER_DATA >> 20} MiB")
            return _Reply(status, body, response.headers)

    def give_up(last: str, attempts: int) -> ProvisionError:
        return ProvisionError(
            f"{service} at {base} did not answer within {env.metadata_wait:g} s: {last}"
        )

    with requests.Session() as session:
        # A proxy from the environment must never see (or answer for) the metadata service.
        session.trust_env = False
        return http.retry_until(deadline, attempt, give_up)


EC2_SERVICE = "EC2 metadata service"


def _ec2_session(env: SourceEnv) -> dict[str, str]:
    """The headers of an IMDSv2 session: its token, asked for first (IMDSv1 is not used)."""
    token_reply = _request(
        env,
        EC2_SERVICE,
        "PUT",
        "/latest/api/token",
        {"X-aws-ec2-metadata-token-ttl-seconds": EC2_TOKEN_TTL},
    )
    token = token_reply.body.strip()
    if token_reply.status == 404 or not token:
        raise ProvisionError(f"{EC2_SERVICE}: no IMDSv2 session token at /latest/api/token")
    try:
        return {"X-aws-ec2-metadata-token": token.decode("ascii")}
    except UnicodeDecodeError:
        raise ProvisionError(f"{EC2_SERVICE}: the IMDSv2 session token is not ASCII") from None


def _ec2(env: SourceEnv, notes: list[str]) -> UserData | None:
    service = EC2_SERVICE
    headers = _ec2_session(env)
    reply = _request(env, service, "GET", "/latest/user-data", headers)
    if reply.status == 404:
        notes.append("EC2: the instance has no user data")
        return None
    meta: dict[str, str] = {}
    for key in ("instance-id", "local-hostname"):
        item = _request(env, service, "GET", f"/latest/meta-data/{key}", headers)
        if item.status != 404 and item.body.strip():
            meta[key] = item.body.decode(errors="replace").strip()
    return _non_empty(reply.body, "EC2 IMDSv2 user-data", notes, meta)


GCE_SERVICE = "GCE metadata server"


def _gce_get(env: SourceEnv, path: str) -> _Reply:
    reply = _request(env, GCE_SERVICE, "GET", path, {"Metadata-Flavor": "Google"})
    # The real server marks every answer, 404s included; anything else is some other server.
    if reply.headers.get("Metadata-Flavor") != "Google":
        raise ProvisionError(
            f"{GCE_SERVICE}: {env.metadata_url.rstrip('/')}{path} answered without the header "
            "'Metadata-Flavor: Google': that is not the GCE metadata server"
        )
    return reply


def _gce(env: SourceEnv, notes: list[str]) -> UserData | None:
    reply = _gce_get(env, "/computeMetadata/v1/instance/attributes/user-data")
    if reply.status == 404:
        notes.append("GCE: the instance has no user-data metadata key")
        return None
    return _non_empty(reply.body, "GCE metadata user-data", notes)


def _openstack_metadata(env: SourceEnv, notes: list[str]) -> UserData | None:
    reply = _request(env, "OpenStack metadata service", "GET", "/openstack/latest/user_data", {})
    if reply.status == 404:
        notes.append("OpenStack: the instance has no user data")
        return None
    return _non_empty(reply.body, "OpenStack metadata user_data", notes)


# Azure


def _decode_base64(text: bytes | str, source: str) -> bytes:
    compact = "".join(
        (text.decode("ascii", "replace") if isinstance(text, bytes) else text).split()
    )
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ProvisionError(f"{source}: expected base64") from None


def parse_ovf_custom_data(xml: bytes, source: str) -> bytes | None:
    """The decoded `CustomData` of Azure's ovf-env.xml; None when it is absent or empty."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise ProvisionError(f"{source}: not valid XML: {e}") from None
    for element in root.iter():
        # The element lives in Azure's namespace ("{http://schemas.microsoft.com/...}CustomData").
        if isinstance(element.tag, str) and element.tag.rpartition("}")[2] == "CustomData":
            text = (element.text or "").strip()
            return _decode_base64(text, f"{source} CustomData") if text else None
    return None


def _azure_ovf(env: SourceEnv, notes: list[str]) -> UserData | None:
    # Azure's provisioning CD is UDF (labelled rd_rdfe_stable.*, which blkid cannot match by
    # pattern); older hosts and tests use ISO 9660. Any such drive with ovf-env.xml is it.
    devices: list[str] = []
    for fstype in ("udf", "iso9660"):
        devices += [d for d in env.drives.find(fstype=fstype) if d not in devices]
    for device in devices:
        where = f"ovf-env.xml on {device}"
        with env.drives.mount(device, ("udf", "iso9660")) as root:
            xml = _read_optional(root / "ovf-env.xml", where)
        if xml is None:
            continue
        data = parse_ovf_custom_data(xml, f"Azure {where}")
        if data is None:
            notes.append(f"Azure: {where} has no custom data")
            return None
        return _non_empty(data, f"Azure custom data ({where})", notes)
    return None


def _azure_imds(env: SourceEnv, notes: list[str]) -> UserData | None:
    path = "/metadata/instance/compute/userData?api-version=2021-01-01&format=text"
    reply = _request(env, "Azure IMDS", "GET", path, {"Metadata": "true"})
    if reply.status == 404 or not reply.body.strip():
        notes.append("Azure: the VM has no custom data and no user data")
        return None
    return _non_empty(
        _decode_base64(reply.body, "Azure IMDS userData"), "Azure IMDS userData", notes
    )


# VMware


def decode_guestinfo(value: bytes, encoding: str, source: str) -> bytes:
    """A guestinfo value by its `.encoding` key, as Ignition and cloud-init read them."""
    match encoding:
        case "":
            return value
        case "base64" | "b64":
            return _decode_base64(value, source)
        case "gzip+base64" | "gz+base64" | "gz+b64":
            try:
                return gunzip(_decode_base64(value, source), source, f"{encoding} value")
            except NotGzip as e:
                raise ProvisionError(f"{source}: not gzip data: {e.reason}") from None
        case _:
            raise ProvisionError(
                f"{source}.encoding: unknown encoding {encoding!r}; expected '', base64 or "
                "gzip+base64"
            )


def _guestinfo(env: SourceEnv, tool: str, key: str) -> bytes | None:
    what = f"VMware guestinfo.{key}"
    argv = [tool, f"info-get guestinfo.{key}"]
    result = _run_tool(argv, what, env.command_timeout)
    if result.returncode != 0:
        if b"No value found" in result.stderr + result.stdout:
            return None
        raise _tool_failed(what, argv, result)
    value = result.stdout.removesuffix(b"\n")
    # guestinfo keys cannot be deleted from a running VM; "---" is the convention for "unset".
    return None if value.strip() in (b"", b"---") else value


def _vmware(env: SourceEnv, notes: list[str]) -> UserData | None:
    try:
        tool = run.find_tool(env.rpctool)
    except ToolMissing:
        notes.append(
            f"VMware: guestinfo cannot be read without {env.rpctool} (open-vm-tools is not in "
            "the image); no config from guestinfo"
        )
        return None
    for key in VMWARE_KEYS:
        value = _guestinfo(env, tool, key)
        if value is None:
            continue
        encoding = _guestinfo(env, tool, f"{key}.encoding") or b""
        source = f"VMware guestinfo.{key}"
        data = decode_guestinfo(value, encoding.decode(errors="replace").strip(), source)
        found = _non_empty(data, source, notes)
        if found is not None:
            return found
    return None


_DRIVES: tuple[_Source, ...] = (_nocloud, _config_drive)
_SOURCES: Mapping[Platform, tuple[_Source, ...]] = {
    Platform.QEMU: (_fw_cfg, *_DRIVES),
    Platform.EC2: (*_DRIVES, _ec2),
    Platform.GCE: (*_DRIVES, _gce),
    Platform.AZURE: (*_DRIVES, _azure_ovf, _azure_imds),
    Platform.VMWARE: (*_DRIVES, _vmware),
    Platform.OPENSTACK: (*_DRIVES, _openstack_metadata),
    Platform.METAL: _DRIVES,
}


# SSH keys the platform holds for the machine (a cloud's key pair)

# The account a cloud's key pair logs in to, as on Fedora CoreOS and Flatcar (Afterburn gives
# the keys of every platform to `core`, whatever user name the console shows).
DEFAULT_USER = "core"
AZURE_KEYS_PATH = "/metadata/instance/compute/publicKeys?api-version=2021-02-01"
# Public key algorithms sshd accepts (ssh -Q key), with the security-key and certificate forms.
KEY_TYPE = re.compile(
    r"(ssh-(rsa|dss|ed25519)|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com"
    r"|sk-ecdsa-sha2-nistp256@openssh\.com|ssh-(rsa|dss|ed25519)-cert-v01@openssh\.com"
    r"|ecdsa-sha2-nistp(256|384|521)-cert-v01@openssh\.com)"
)
BASE64_BLOB = re.compile(r"[A-Za-z0-9+/]+={0,2}")


@dataclass(frozen=True)
class PlatformKeys:
    """The public keys a platform holds for this machine, for DEFAULT_USER."""

    keys: tuple[str, ...]
    source: str  # for messages and the stamp: "EC2 IMDSv2 public-keys"
    notes: tuple[str, ...] = ()


def check_public_key(text: str, where: str) -> str:
    """`text` as one authorized_keys line (`type base64 [comment]`), or a ProvisionError naming
    `where`: a platform's answer goes into a file sshd reads, so it is checked like a config."""
    line = text.strip()
    parts = line.split(None, 2)
    if (
        "\n" in line
        or "\r" in line
        or "\0" in line
        or len(parts) < 2
        or not KEY_TYPE.fullmatch(parts[0])
        or not BASE64_BLOB.fullmatch(parts[1])
    ):
        raise field_error(
            where, "key", "an SSH public key on one line ('ssh-ed25519 AAAA... comment')", line
        )
    return line


def find_platform_keys(platform: Platform, *, env: SourceEnv = DEFAULT_ENV) -> PlatformKeys | None:
    """The key pair the machine was launched with (EC2, GCE, Azure), or None where the platform
    has none. A metadata service that is broken raises ProvisionError, as for user data."""
    source = _KEY_SOURCES.get(platform)
    if source is None:
        return None
    notes: list[str] = []
    found = source(env, notes)
    if found is None:
        for note in notes:
            log.warning("%s", note)
        return None
    return dataclasses.replace(found, notes=(*notes, *found.notes))


def _key_lines(body: bytes, where: str) -> list[str]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise field_error(where, "key", "UTF-8 text") from None
    return [check_public_key(line, where) for line in text.splitlines() if line.strip()]


def _ec2_keys(env: SourceEnv, notes: list[str]) -> PlatformKeys | None:
    headers = _ec2_session(env)
    listing_path = "/latest/meta-data/public-keys/"
    listing = _request(env, EC2_SERVICE, "GET", listing_path, headers)
    if listing.status == 404 or not listing.body.strip():
        notes.append("EC2: the instance was launched without a key pair")
        return None
    keys: list[str] = []
    for number, line in enumerate(listing.body.decode(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        # One line per key pair: "0=my-key-name".
        index, equals, _ = line.strip().partition("=")
        if not equals or not index.isascii() or not index.isdigit():
            raise field_error(
                f"EC2 IMDSv2 {listing_path}", f"line {number}", "'<index>=<key name>'", line
            )
        path = f"{listing_path}{int(index)}/openssh-key"
        reply = _request(env, EC2_SERVICE, "GET", path, headers)
        if reply.status == 404:
            raise ProvisionError(f"{EC2_SERVICE}: {path}: the key pair {line!r} has no OpenSSH key")
        keys += _key_lines(reply.body, f"EC2 IMDSv2 {path}")
    return PlatformKeys(tuple(dict.fromkeys(keys)), "EC2 IMDSv2 public-keys") if keys else None


def _gce_key_lines(body: bytes, where: str, notes: list[str], now: float) -> list[str]:
    """`ssh-keys` metadata: one `user:key` per line. The user names the account GCE's own guest
    agent would make; Berth gives every key to DEFAULT_USER, as Afterburn does. A key that
    gcloud made with an expiry (`google-ssh {"expireOn": ...}`) is left out once expired."""
    keys: list[str] = []
    for number, line in enumerate(body.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        user, colon, key = line.strip().partition(":")
        if not colon or not user:
            raise field_error(where, f"line {number}", "'<user>:<ssh public key>'", line)
        key = check_public_key(key, f"{where} line {number}")
        parts = key.split(None, 3)
        if len(parts) == 4 and parts[2] == "google-ssh":
            expiry = _gce_expiry(parts[3], f"{where} line {number}")
            if expiry is not None and expiry <= now:
                notes.append(f"GCE: {where} line {number}: the key for {user} expired, left out")
                continue
        keys.append(key)
    return keys


def _gce_expiry(text: str, where: str) -> float | None:
    try:
        doc = json.loads(text)
    except ValueError:
        raise field_error(where, "google-ssh", "a JSON object after 'google-ssh'", text) from None
    stamp = doc.get("expireOn") if isinstance(doc, dict) else None
    if stamp is None:
        return None
    try:
        # "2026-12-31T23:59:59+0000" (gcloud) or with a "Z".
        parsed = datetime.datetime.strptime(str(stamp).replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S%z")
    except ValueError:
        raise field_error(
            where, "google-ssh.expireOn", "a time like 2026-12-31T23:59:59+0000", stamp
        ) from None
    return parsed.timestamp()


def _gce_keys(env: SourceEnv, notes: list[str]) -> PlatformKeys | None:
    base = "/computeMetadata/v1"
    now = time.time()
    block = _gce_get(env, f"{base}/instance/attributes/block-project-ssh-keys")
    blocked = block.status != 404 and block.body.strip().lower() == b"true"
    paths = [f"{base}/instance/attributes/ssh-keys", f"{base}/instance/attributes/sshKeys"]
    if blocked:
        notes.append("GCE: the instance blocks project-wide SSH keys")
    else:
        paths.append(f"{base}/project/attributes/ssh-keys")
    keys: list[str] = []
    for path in paths:
        reply = _gce_get(env, path)
        if reply.status != 404:
            keys += _gce_key_lines(reply.body, f"GCE metadata {path}", notes, now)
    if not keys:
        notes.append("GCE: no ssh-keys in the instance's or the project's metadata")
        return None
    return PlatformKeys(tuple(dict.fromkeys(keys)), "GCE metadata ssh-keys")


def _azure_keys(env: SourceEnv, notes: list[str]) -> PlatformKeys | None:
    where = "Azure IMDS publicKeys"
    reply = _request(env, "Azure IMDS", "GET", AZURE_KEYS_PATH, {"Metadata": "true"})
    if reply.status == 404 or not reply.body.strip():
        notes.append("Azure: the VM has no SSH public keys")
        return None
    try:
        doc = json.loads(reply.body)
    except ValueError as e:
        raise field_error(where, "(top level)", f"JSON ({e})") from None
    if not isinstance(doc, list):
        raise field_error(where, "(top level)", "a list of {keyData, path}", doc)
    keys: list[str] = []
    for i, entry in enumerate(doc):
        data = entry.get("keyData") if isinstance(entry, dict) else None
        if not isinstance(data, str):
            raise field_error(where, f"[{i}].keyData", "an SSH public key", data)
        # keyData may carry Windows line ends; `path` names the admin user's home, whose
        # account Berth does not make: the keys go to DEFAULT_USER.
        keys += _key_lines(data.encode(), f"{where}[{i}].keyData")
    if not keys:
        notes.append("Azure: the VM has no SSH public keys")
        return None
    return PlatformKeys(tuple(dict.fromkeys(keys)), where)


_KeySource = Callable[[SourceEnv, list[str]], PlatformKeys | None]
_KEY_SOURCES: Mapping[Platform, _KeySource] = {
    Platform.EC2: _ec2_keys,
    Platform.GCE: _gce_keys,
    Platform.AZURE: _azure_keys,
}
