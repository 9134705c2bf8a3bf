"""Publishing releases into a static TUF repository, with python-tuf's Metadata API.

What the command line, the image builder, the tests and bench/ use is re-exported here; the
modules behind it, each importing only those listed before it:

    keys.py        the keys directory: generating keys, loading signers, rotating a key,
                   renewing the root, describing them; the roles and how long their signatures last;
                   refusing keys another user could read or change
    staging.py     a change's new repository files, written aside and put in place together at the
                   end, or removed so that a failed change leaves the repository as it was
    repository.py  the repository's state: loading and verifying its metadata, the lock, signing
                   and writing a change (timestamp last), re-signing before expiry (`refresh`)
    channels.py    channel documents: reading and writing them, pulling a release, pinning a
                   channel's max_version
    releases.py    a release directory into the repository and a channel (`publish`)
    secureboot.py  the Secure Boot keys (PK, KEK, db as X.509 certificates) in <keys>/secureboot/:
                   making them once, describing them, refusing private keys others could read

Besides python-tuf they may import builder.errors, builder.lock and the formats the agent reads
(updater.files, updater.release); never the command line (cli/) or qemu/.
"""

from builder.errors import PublishError
from builder.publish.channels import pull, read_channel, set_max_version
from builder.publish.keys import describe_keys, has_keys, init_keys, renew_root, rotate_key
from builder.publish.releases import publish, read_release
from builder.publish.repository import PublishResult, refresh

__all__ = [
    "PublishError",
    "PublishResult",
    "describe_keys",
    "has_keys",
    "init_keys",
    "publish",
    "pull",
    "read_channel",
    "read_release",
    "refresh",
    "renew_root",
    "rotate_key",
    "set_max_version",
]
