"""Make OCI image archives locally (no registry is reachable in tests): `podman load` reads them."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import textwrap
from pathlib import Path

from builder.run import run

HELLO_C = textwrap.dedent(
    """\
    #include <stdio.h>
    #include <string.h>
    #include <unistd.h>
    int main(int argc, char **argv) {
        /* Proves the container ran and saw its own root: print a marker and our argv. */
        printf("berth-container-ok");
        for (int i = 1; i < argc; i++) printf(" %s", argv[i]);
        printf("\\n");
        return access("/hello", X_OK) == 0 ? 0 : 3;
    }
    """
)


# A container's long-running service: sleeps until stopped (SIGTERM ends it: it is PID 1).
SLEEPER_C = textwrap.dedent(
    """\
    #include <signal.h>
    #include <stdlib.h>
    #include <unistd.h>
    static void stop(int sig) { (void)sig; exit(0); }
    int main(void) {
        signal(SIGTERM, stop);
        for (;;) pause();
    }
    """
)


def static_binary(workdir: Path, name: str, source: str) -> bytes:
    """A tiny statically linked program from C `source`, compiled with the host's gcc."""
    path = workdir / f"{name}.c"
    path.write_text(source)
    binary = workdir / name
    run(["gcc", "-static", "-Os", "-s", "-o", binary, path])
    return binary.read_bytes()


def static_hello(workdir: Path) -> bytes:
    return static_binary(workdir, "hello", HELLO_C)


def _blob(data: bytes) -> tuple[str, bytes]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def _tar(members: dict[str, tuple[bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (data, mode) in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def oci_archive(files: dict[str, tuple[bytes, int]], cmd: list[str], ref: str) -> bytes:
    """An oci-archive (tar of an OCI image layout) with one layer holding `files`."""
    layer_digest, layer = _blob(_tar(files))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }
    config_digest, config_blob = _blob(json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": len(config_blob),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": len(layer),
            }
        ],
    }
    manifest_digest, manifest_blob = _blob(json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest_blob),
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
        ],
    }
    members: dict[str, tuple[bytes, int]] = {
        "oci-layout": (b'{"imageLayoutVersion": "1.0.0"}', 0o644),
        "index.json": (json.dumps(index).encode(), 0o644),
    }
    for digest, data in (
        (layer_digest, layer),
        (config_digest, config_blob),
        (manifest_digest, manifest_blob),
    ):
        members["blobs/sha256/" + digest.removeprefix("sha256:")] = (data, 0o644)
    return _tar(members)
