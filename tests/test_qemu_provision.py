"""The harness's provisioning helpers: DMI strings, the user network, guest forwards through
relay.py, and config drive images. Fast: QEMU is at most started paused, never booted."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.run import run
from qemu import vm as vm_module
from qemu.drives import make_cidata, make_config_drive
from qemu.vm import (
    RELAY,
    VMConfig,
    VMError,
    guest_forward_option,
    nic_argument,
    user_network_options,
)
from tests.support.misbehaving_server import HalfCloseServer, refusing_port
from tests.support.vms import option_values, prepared_vm

METADATA_NET = "169.254.169.0/24"
EC2_SMBIOS = "type=1,manufacturer=Amazon EC2,product=t3.micro"


def relay_command(host_port: int) -> str:
    return shlex.join([sys.executable, str(RELAY), "127.0.0.1", str(host_port)])


# Command line


def test_metadata_network_command_line(tmp_path: Path, blank: Path) -> None:
    vm = prepared_vm(
        tmp_path,
        blank,
        smbios=(EC2_SMBIOS, "type=3,asset=berth-test"),
        user_network=METADATA_NET,
        guest_forwards=(("169.254.169.254", 80, 18080), ("169.254.169.100", 8443, 18443)),
        port_forwards=((18000, 8000),),
    )
    argv = vm.command()
    assert option_values(argv, "-nic") == [
        f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{vm.ssh_port}-:22"
        ",hostfwd=tcp:127.0.0.1:18000-:8000"
        ",net=169.254.169.0/24,host=169.254.169.2,dns=169.254.169.3,dhcpstart=169.254.169.15"
        f",guestfwd=tcp:169.254.169.254:80-cmd:{relay_command(18080)}"
        f",guestfwd=tcp:169.254.169.100:8443-cmd:{relay_command(18443)}"
    ]
    smbios = option_values(argv, "-smbios")
    # The harness's own credentials stay; the extra tables follow them.
    assert smbios[0].startswith("type=11,value=io.systemd.credential.binary:")
    assert smbios[-2:] == [EC2_SMBIOS, "type=3,asset=berth-test"]


def test_defaults_leave_the_network_as_it_was(tmp_path: Path, blank: Path) -> None:
    vm = prepared_vm(tmp_path, blank)
    argv = vm.command()
    assert option_values(argv, "-nic") == [
        f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{vm.ssh_port}-:22"
    ]
    assert all(value.startswith("type=11,") for value in option_values(argv, "-smbios"))


def test_guest_forward_in_the_default_network(tmp_path: Path, blank: Path) -> None:
    vm = prepared_vm(tmp_path, blank, guest_forwards=(("10.0.2.100", 80, 9000),))
    (nic,) = option_values(vm.command(), "-nic")
    assert nic.endswith(f",guestfwd=tcp:10.0.2.100:80-cmd:{relay_command(9000)}")
    assert "net=" not in nic


def test_relay_command_is_quoted_and_comma_escaped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vm_module, "RELAY", Path("/opt/my tools,v2/relay.py"))
    network, _ = user_network_options(METADATA_NET)
    option = guest_forward_option("169.254.169.254", 80, 8080, network)
    # Shell quoting for slirp's argv parsing, then QEMU's doubled commas around it.
    assert option == (
        f"guestfwd=tcp:169.254.169.254:80-cmd:{shlex.quote(sys.executable)} "
        "'/opt/my tools,,v2/relay.py' 127.0.0.1 8080"
    )


@pytest.mark.parametrize(
    ("network", "message"),
    [
        ("169.254.169.5/24", "not an IPv4 network"),  # host bits set
        ("fd00::/64", "not an IPv4 network"),
        ("metadata", "not an IPv4 network"),
        ("169.254.169.0/28", "prefix must be /4 to /27"),
        ("0.0.0.0/3", "prefix must be /4 to /27"),
    ],
)
def test_bad_user_networks_are_refused(network: str, message: str) -> None:
    with pytest.raises(VMError, match=message):
        user_network_options(network)


@pytest.mark.parametrize(
    ("forward", "network", "message"),
    [
        # QEMU's own network cannot hold the metadata address: the hint says what to set.
        (("169.254.169.254", 80, 8080), None, "outside the user network 10.0.2.0/24"),
        (("169.254.169.2", 80, 8080), METADATA_NET, "the gateway"),
        (("169.254.169.3", 53, 8080), METADATA_NET, "the DNS server"),
        (("169.254.169.15", 80, 8080), METADATA_NET, "the guest's own address"),
        (("169.254.169.0", 80, 8080), METADATA_NET, "the network address"),
        (("169.254.169.255", 80, 8080), METADATA_NET, "the broadcast address"),
        (("metadata.local", 80, 8080), METADATA_NET, "not an IPv4 address"),
        (("169.254.169.254", 0, 8080), METADATA_NET, "guest port 0"),
        (("169.254.169.254", 80, 70000), METADATA_NET, "host port 70000"),
    ],
)
def test_bad_guest_forwards_are_refused(
    forward: tuple[str, int, int], network: str | None, message: str, blank: Path
) -> None:
    config = VMConfig(disk=blank, user_network=network, guest_forwards=(forward,))
    with pytest.raises(VMError, match=message):
        nic_argument(config, 2222)


def test_outside_the_network_hint_names_the_setting(blank: Path) -> None:
    config = VMConfig(disk=blank, guest_forwards=(("169.254.169.254", 80, 8080),))
    with pytest.raises(VMError) as e:
        nic_argument(config, 2222)
    assert e.value.hint is not None and "user_network" in e.value.hint
    assert "169.254.169.0/24" in e.value.hint


def test_a_guest_forward_given_twice_is_refused(blank: Path) -> None:
    forward = ("169.254.169.254", 80, 8080)
    config = VMConfig(disk=blank, user_network=METADATA_NET, guest_forwards=(forward, forward))
    with pytest.raises(VMError, match="given twice"):
        nic_argument(config, 2222)


def test_qemu_accepts_the_network_and_forwards_ssh_to_the_guest(
    tmp_path: Path, blank: Path
) -> None:
    """Real QEMU parses the -nic value (slirp checks every address) without running a guest."""
    vm = prepared_vm(
        tmp_path,
        blank,
        user_network=METADATA_NET,
        guest_forwards=(("169.254.169.254", 80, 18080),),
        smbios=(EC2_SMBIOS,),
    )
    argv = vm.command()
    qmp = [
        {"execute": "qmp_capabilities"},
        {"execute": "human-monitor-command", "arguments": {"command-line": "info usernet"}},
        {"execute": "quit"},
    ]
    probe = [
        argv[0],
        *("-machine", "q35", "-accel", "tcg", "-m", "64", "-nodefaults", "-no-user-config"),
        *("-display", "none", "-S", "-qmp", "stdio"),
        *("-nic", *option_values(argv, "-nic")),
        *("-smbios", EC2_SMBIOS),
    ]
    result = subprocess.run(
        ["timeout", "60", *probe],
        input="".join(json.dumps(c) + "\n" for c in qmp).encode(),
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    usernet = next(r["return"] for r in replies if isinstance(r.get("return"), str))
    # SSH still reaches the guest, now at its address in the metadata network.
    assert re.search(
        rf"HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+{vm.ssh_port}\s+169\.254\.169\.15\s+22\b", usernet
    )


def test_qemu_refuses_what_the_harness_refuses() -> None:
    """The check in guest_forward_option mirrors slirp's: QEMU itself fails the same forward."""
    result = subprocess.run(
        [
            *("timeout", "60", "qemu-system-x86_64", "-machine", "none", "-nodefaults"),
            *("-display", "none", "-S", "-netdev"),
            "user,id=n0,guestfwd=tcp:169.254.169.254:80-cmd:true",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    assert result.returncode != 0
    assert b"Conflicting/invalid host:port in guest forwarding rule" in result.stderr


# relay.py


@pytest.fixture
def server() -> Iterator[HalfCloseServer]:
    srv = HalfCloseServer(lambda request: b"answer:" + request[::-1])
    yield srv
    srv.close()


def test_relay_over_pipes_half_closes(server: HalfCloseServer) -> None:
    request = b"GET /latest/user-data HTTP/1.0\r\n\r\n" + os.urandom(200_000)
    result = subprocess.run(
        [sys.executable, str(RELAY), "127.0.0.1", str(server.port)],
        input=request,
        capture_output=True,
        timeout=30,
        check=False,
    )
    # The server answered only after it saw our end of input, so the answer proves the half-close.
    assert result.returncode == 0
    assert server.received == request
    assert result.stdout == b"answer:" + request[::-1]
    assert result.stderr == b""


def test_relay_over_one_socket_like_qemu(server: HalfCloseServer) -> None:
    """slirp hands the relay one socket as stdin, stdout and stderr; EOF must still get through."""
    guest, relay_end = socket.socketpair()
    with guest, relay_end:
        proc = subprocess.Popen(
            [sys.executable, str(RELAY), "127.0.0.1", str(server.port)],
            stdin=relay_end.fileno(),
            stdout=relay_end.fileno(),
            stderr=relay_end.fileno(),
        )
        relay_end.close()
        guest.sendall(b"hello")
        guest.shutdown(socket.SHUT_WR)
        guest.settimeout(30)
        answer = b""
        while chunk := guest.recv(65536):
            answer += chunk
        assert proc.wait(timeout=30) == 0
    assert answer == b"answer:olleh"


def test_relay_to_a_closed_port_fails_quietly() -> None:
    with refusing_port() as port:
        result = subprocess.run(
            [sys.executable, str(RELAY), "127.0.0.1", str(port)],
            input=b"x",
            capture_output=True,
            timeout=30,
            check=False,
        )
    # Under QEMU stderr is the guest's connection: nothing may be written there.
    assert (result.returncode, result.stdout, result.stderr) == (1, b"", b"")


# Config drive images


def blkid(path: Path) -> dict[str, str]:
    out = run(["blkid", "-c", "/dev/null", "-o", "export", path], capture=True).stdout.decode()
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def mtools(*argv: str | Path) -> str:
    env = {"MTOOLS_SKIP_CHECK": "1"}
    return run(list(argv), capture=True, env=env).stdout.decode()


def test_cidata_image(tmp_path: Path) -> None:
    user_data = b"#cloud-config\nhostname: vm-1\n"
    image = make_cidata(tmp_path / "seed.img", user_data, "instance-id: i-1\n")
    assert image == tmp_path / "seed.img"
    info = blkid(image)
    assert (info["LABEL"], info["TYPE"]) == ("cidata", "vfat")
    assert sorted(mtools("mdir", "-b", "-i", image, "::").split()) == [
        "::/meta-data",
        "::/user-data",
    ]
    assert mtools("mtype", "-i", image, "::user-data").encode() == user_data
    assert mtools("mtype", "-i", image, "::meta-data") == "instance-id: i-1\n"


def test_config_drive_image(tmp_path: Path) -> None:
    image = make_config_drive(
        tmp_path / "config2.img", b'{"ignition": {}}', {"uuid": "u-1", "hostname": "h"}
    )
    info = blkid(image)
    assert (info["LABEL"], info["TYPE"]) == ("config-2", "vfat")
    assert sorted(mtools("mdir", "-b", "-i", image, "::openstack/latest").split()) == [
        "::/openstack/latest/meta_data.json",
        "::/openstack/latest/user_data",
    ]
    assert mtools("mtype", "-i", image, "::openstack/latest/user_data") == '{"ignition": {}}'
    meta = json.loads(mtools("mtype", "-i", image, "::openstack/latest/meta_data.json"))
    assert meta == {"uuid": "u-1", "hostname": "h"}


def test_large_user_data_fits_and_an_old_image_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "seed.img"
    path.write_bytes(b"old junk")
    big = os.urandom(3 << 20)
    make_cidata(path, big, "instance-id: big\n")
    out = tmp_path / "out"
    mtools("mcopy", "-i", path, "::user-data", out)
    assert out.read_bytes() == big
