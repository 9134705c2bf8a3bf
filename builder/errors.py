"""The builder's exception tree: libraries raise these, only the CLI turns them into exit codes."""

from __future__ import annotations


class BuildError(Exception):
    """A build cannot go on. The message says what failed; `hint` says what to do about it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class ConfigError(BuildError):
    """An image definition, overlay or template is malformed: the message names file and field."""


class ToolMissing(BuildError):
    """A host tool is not installed; the hint names the Debian package that provides it."""


class PublishError(BuildError):
    """A release cannot be published, or the keys or repository are not in a usable state."""
