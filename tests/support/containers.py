"""A quadlet service with a named volume, for VM tests: install it, and check that it answers.

The container runs `httpd` (tests/support/oci.py) from the image `localhost/berth/httpd:1`, which
a test either preloads into the OS image (`httpd_archive` + `preload`) or loads with `podman load`.
It publishes port 8080, keeps its data in the named volume `web-data` (a `.volume` quadlet), records
every start in the volume's `starts` file and serves the volume's `index.html`.

Update tests reuse it: `install_web_service` before the update, `web_answers` and `web_starts`
after each boot to prove the service came back with its data.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.support.oci import oci_archive, static_httpd

IMAGE = "localhost/berth/httpd:1"
PORT = 8080
VOLUME = "web-data"

QUADLETS = {
    "web.container": f"""\
[Unit]
Description=Berth test web server (quadlet)

[Container]
ContainerName=web
Image={IMAGE}
Exec=/httpd {PORT} /data
Volume={VOLUME}.volume:/data
PublishPort={PORT}:{PORT}

[Service]
Restart=always

[Install]
WantedBy=multi-user.target
""",
    f"{VOLUME}.volume": f"""\
[Volume]
VolumeName={VOLUME}
""",
}


def httpd_archive(workdir: Path, *, docker: bool = False) -> bytes:
    """The oci-archive of IMAGE (add `docker` for `docker load`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    files = {"httpd": (static_httpd(workdir), 0o755)}
    ref = IMAGE.removeprefix("localhost/")
    return oci_archive(files, ["/httpd", str(PORT), "/data"], ref, docker=docker)


def load_httpd_image(vm: Any, workdir: Path) -> None:
    """`podman load` IMAGE on a machine whose OS image does not preload it."""
    vm.ssh("cat > /var/tmp/httpd.tar", input=httpd_archive(workdir))
    vm.ssh("podman load -q -i /var/tmp/httpd.tar && rm /var/tmp/httpd.tar", timeout=300)


def install_web_service(vm: Any, index: str) -> None:
    """Write the quadlet files, start the service and put `index` into its volume."""
    for name, text in QUADLETS.items():
        vm.ssh(f"cat > /etc/containers/systemd/{name}", input=text.encode())
    vm.ssh("systemctl daemon-reload && systemctl start web.service", timeout=300)
    mountpoint = vm.ssh_output(f"podman volume inspect --format '{{{{.Mountpoint}}}}' {VOLUME}")
    vm.ssh(f"cat > {mountpoint}/index.html", input=index.encode())


def web_answers(vm: Any, timeout: float = 300.0) -> str:
    """The body the service returns on its port, waiting for it to come up."""
    deadline = time.monotonic() + timeout
    while True:
        result = vm.ssh(f"curl -sf --max-time 5 http://127.0.0.1:{PORT}/", check=False)
        if result.returncode == 0:
            return str(result.stdout.decode())
        if time.monotonic() > deadline:
            status = vm.ssh("systemctl status web.service --no-pager", check=False)
            raise AssertionError(
                f"web.service did not answer on port {PORT} within {timeout:.0f}s:\n"
                + status.stdout.decode(errors="replace")
            )
        time.sleep(2)


def web_starts(vm: Any) -> int:
    """How many times the container has started on this machine (kept in its volume)."""
    mountpoint = vm.ssh_output(f"podman volume inspect --format '{{{{.Mountpoint}}}}' {VOLUME}")
    return len(vm.ssh_output(f"cat {mountpoint}/starts").split())
