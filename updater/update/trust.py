"""The agent's view of the signed repository: TUF refresh through python-tuf's ngclient.

Runs on the device with Debian's python3-tuf. The only trust anchor is the root metadata embedded
in the verity-protected image (`/usr/share/berth/tuf/root.json`); verified metadata is cached in
`metadata_dir` (under /var/lib/berth) so that a repository cannot roll a machine back to older
metadata between checks.

Payload targets are not downloaded here: `target_info` returns their signed length and hash and
the consistent-snapshot URL, and the agent streams them straight into a slot, checking both.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import NamedTuple

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from updater import files
from updater.errors import UpdateError
from updater.release import channel as channels
from updater.release.channel import ChannelManifest

_ROLLBACK_MESSAGE = re.compile(r"must be >=|Expected \S+\.json version")


class TrustError(UpdateError):
    """The repository could not be trusted or reached; the message says what was refused and why."""


class RepositoryUnreachable(TrustError):
    """Network failure, timeout or HTTP error: nothing was refused, nothing was learned."""


class BadSignature(TrustError):
    """Metadata is not signed by the keys the trusted root names."""


class MetadataExpired(TrustError):
    """Metadata has expired: a freeze attack, or a publisher that stopped refreshing."""


class RollbackRefused(TrustError):
    """The repository offers metadata older than what this machine has already seen."""


class MetadataMismatch(TrustError):
    """A metadata file does not match the version, length or hash the role above it signed:
    mix-and-match of repository states, a corrupted mirror, or endless data."""


class TargetMismatch(TrustError):
    """A downloaded target does not match its signed length or hash."""


class TargetNotFound(TrustError):
    """The signed metadata lists no such target."""


class TargetInfo(NamedTuple):
    length: int
    sha256: str
    url: str


def _describe(error: Exception) -> str:
    text = str(error)
    return text if text else type(error).__name__


def _translate(error: Exception, what: str) -> TrustError:
    """Map python-tuf's exceptions onto ours, with a message for a human."""
    detail = _describe(error)
    if isinstance(error, tuf_errors.UnsignedMetadataError):
        return BadSignature(f"refused {what}: signature check failed ({detail})")
    if isinstance(error, tuf_errors.ExpiredMetadataError):
        return MetadataExpired(
            f"refused {what}: metadata has expired ({detail}); the repository is stale or "
            "replayed, and its publisher must refresh it"
        )
    if isinstance(error, tuf_errors.EqualVersionNumberError):
        return MetadataMismatch(f"refused {what}: {detail}")
    if isinstance(error, tuf_errors.BadVersionNumberError):
        # python-tuf 5.1 raises one class for two cases; its messages tell them apart: "must be
        # >= N" and "Expected targets.json version N" compare against what this machine saw
        # before, other "Expected ..." messages against what the role above signed just now.
        if _ROLLBACK_MESSAGE.search(detail):
            return RollbackRefused(
                f"refused {what}: {detail}; the repository offers older metadata than this "
                "machine has already seen (rollback)"
            )
        return MetadataMismatch(
            f"refused {what}: {detail}; the repository mixes files from different states"
        )
    if isinstance(error, tuf_errors.LengthOrHashMismatchError):
        return MetadataMismatch(
            f"refused {what}: {detail}; a file does not match what the role above it signed "
            "(mixed repository states or a corrupted mirror)"
        )
    if isinstance(error, tuf_errors.DownloadLengthMismatchError):
        return MetadataMismatch(f"refused {what}: {detail} (endless data)")
    if isinstance(error, tuf_errors.DownloadHTTPError):
        return RepositoryUnreachable(
            f"cannot fetch {what}: HTTP status {error.status_code} ({detail})"
        )
    if isinstance(error, tuf_errors.SlowRetrievalError):
        return RepositoryUnreachable(f"cannot fetch {what}: the server is too slow or timed out")
    if isinstance(error, tuf_errors.DownloadError):
        cause = error.__cause__
        reason = _describe(cause) if isinstance(cause, Exception) else detail
        return RepositoryUnreachable(f"cannot fetch {what}: {reason}")
    if isinstance(error, tuf_errors.RepositoryError):
        return TrustError(f"refused {what}: {detail}")
    return TrustError(f"{what} failed: {detail}")


def _root_version(path: Path) -> int | None:
    """The version of a root metadata file, or None when it is missing or unreadable."""
    try:
        doc = json.loads(path.read_bytes())
        version = doc["signed"]["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


class TrustedRepository:
    """A TUF repository as this machine sees it: refreshed metadata, channels, target info."""

    def __init__(
        self,
        metadata_dir: Path,
        trusted_root: Path,
        metadata_url: str,
        targets_url: str,
        fetcher: FetcherInterface | None = None,
    ) -> None:
        self.metadata_dir = metadata_dir
        self.trusted_root = trusted_root
        self.metadata_url = metadata_url if metadata_url.endswith("/") else metadata_url + "/"
        self.targets_url = targets_url if targets_url.endswith("/") else targets_url + "/"
        self._fetcher = fetcher
        self._updater: Updater | None = None

    def _seed_root(self) -> None:
        """Put the image's root into the cache unless the cache already trusts a newer one.

        The cache can only hold a root reached from an embedded one by verified rotations, so a
        higher version there is trustworthy; a lower or unreadable one is replaced, which lets an
        image that ships a newer root advance the trust anchor.
        """
        embedded = _root_version(self.trusted_root)
        if embedded is None:
            raise TrustError(
                f"the trusted root {self.trusted_root} is missing or unreadable; the image is "
                "broken"
            )
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        cached_path = self.metadata_dir / "root.json"
        cached = _root_version(cached_path)
        if cached is not None and cached >= embedded:
            return
        files.write_file_atomic(cached_path, self.trusted_root.read_bytes())

    def refresh(self) -> None:
        """Fetch and verify root, timestamp, snapshot and targets metadata (the TUF workflow)."""
        self._seed_root()
        try:
            updater = Updater(
                metadata_dir=str(self.metadata_dir),
                metadata_base_url=self.metadata_url,
                target_base_url=self.targets_url,
                fetcher=self._fetcher,
                config=UpdaterConfig(app_user_agent="berth-update"),
            )
            updater.refresh()
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as e:
            self._updater = None
            raise _translate(e, f"repository metadata from {self.metadata_url}") from e
        except ValueError as e:
            # The cached root is unparsable: the embedded one is the anchor to start over from.
            self._updater = None
            raise TrustError(f"cached metadata in {self.metadata_dir} is unusable: {e}") from e
        self._updater = updater

    def _ready(self) -> Updater:
        if self._updater is None:
            self.refresh()
        assert self._updater is not None
        return self._updater

    def _targetinfo(self, path: str) -> TargetFile:
        updater = self._ready()
        try:
            info = updater.get_targetinfo(path)
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as e:
            raise _translate(e, f"target {path}") from e
        if info is None:
            raise TargetNotFound(f"the repository's signed metadata lists no target {path}")
        return info

    def target_info(self, path: str) -> TargetInfo:
        """Signed length, sha256 and consistent-snapshot URL of a target, without fetching it."""
        info = self._targetinfo(path)
        digest = info.hashes.get("sha256")
        if digest is None:
            raise TrustError(f"target {path} has no sha256 hash in the signed metadata")
        directory, sep, name = path.rpartition("/")
        return TargetInfo(info.length, digest, f"{self.targets_url}{directory}{sep}{digest}.{name}")

    def channel(self, name: str) -> ChannelManifest:
        """The channel manifest, downloaded and checked through TUF, then parsed."""
        if not channels.CHANNEL_NAME.fullmatch(name):
            raise ValueError(f"channel name {name!r} is not usable")
        path = f"channels/{name}.json"
        info = self._targetinfo(path)
        updater = self._ready()
        with tempfile.TemporaryDirectory(prefix="berth-channel-") as temp:
            local = os.path.join(temp, "channel.json")
            try:
                updater.download_target(info, filepath=local)
            except tuf_errors.LengthOrHashMismatchError as e:
                raise TargetMismatch(
                    f"refused target {path}: it does not match its signed length and hash ({e})"
                ) from e
            except tuf_errors.DownloadLengthMismatchError as e:
                raise TargetMismatch(
                    f"refused target {path}: longer than its signed length {info.length} ({e})"
                ) from e
            except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as e:
                raise _translate(e, f"target {path}") from e
            # Bytes: text that is not UTF-8 is the parser's ChannelError, not a crash.
            text = Path(local).read_bytes()
        manifest = channels.parse(text, path)
        if manifest.channel != name:
            raise channels.ChannelError(f"{path}: names channel {manifest.channel!r}")
        return manifest
