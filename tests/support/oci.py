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


# `httpd PORT DIR`: a web server small enough to write here, for containers that answer on a port.
# It records each start in DIR/starts (proving the volume is writable and persists) and answers
# every request with DIR/index.html, or "berth-httpd-ok" when there is none.
HTTPD_C = textwrap.dedent(
    """\
    #include <fcntl.h>
    #include <netinet/in.h>
    #include <signal.h>
    #include <stdio.h>
    #include <stdlib.h>
    #include <string.h>
    #include <sys/socket.h>
    #include <unistd.h>
    static void stop(int sig) { (void)sig; _exit(0); }
    int main(int argc, char **argv) {
        if (argc != 3) return 2;
        /* PID 1 in a container ignores SIGTERM unless it handles it: stop promptly. */
        signal(SIGTERM, stop);
        signal(SIGINT, stop);
        char path[4096];
        snprintf(path, sizeof path, "%s/starts", argv[2]);
        FILE *starts = fopen(path, "a");
        if (!starts) return 3;
        fputs("start\\n", starts);
        fclose(starts);
        int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
        if (bind(s, (struct sockaddr *)&addr, sizeof addr) || listen(s, 16)) return 4;
        snprintf(path, sizeof path, "%s/index.html", argv[2]);
        for (;;) {
            int c = accept(s, 0, 0);
            if (c < 0) continue;
            char request[4096], body[65536];
            read(c, request, sizeof request);
            int fd = open(path, O_RDONLY), n = 0;
            if (fd >= 0) { n = read(fd, body, sizeof body); close(fd); }
            if (n <= 0) n = snprintf(body, sizeof body, "berth-httpd-ok\\n");
            char head[256];
            int h = snprintf(head, sizeof head,
                             "HTTP/1.0 200 OK\\r\\nContent-Type: text/plain\\r\\n"
                             "Content-Length: %d\\r\\nConnection: close\\r\\n\\r\\n", n);
            write(c, head, h);
            write(c, body, n);
            close(c);
        }
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


def static_httpd(workdir: Path) -> bytes:
    return static_binary(workdir, "httpd", HTTPD_C)


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


def oci_archive(
    files: dict[str, tuple[bytes, int]], cmd: list[str], ref: str, *, docker: bool = False
) -> bytes:
    """An oci-archive (tar of an OCI image layout) with one layer holding `files`.

    `docker`: add the manifest.json of `docker save`, which `docker load` needs (the same combined
    layout Docker 25 and later write), tagged with `ref`.
    """
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
    if docker:
        entry = {
            "Config": "blobs/sha256/" + config_digest.removeprefix("sha256:"),
            "RepoTags": [ref],
            "Layers": ["blobs/sha256/" + layer_digest.removeprefix("sha256:")],
        }
        members["manifest.json"] = (json.dumps([entry]).encode(), 0o644)
    return _tar(members)
