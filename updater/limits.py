"""The bounds every reader and writer of Berth's inputs applies: one place, so that the builder
refuses at build time exactly what the agent would refuse on the machine.

A value past a bound is refused with a message naming the file and the field, never clamped: a
limit that silently shrinks a number hides the operator's typo. The bounds are generous (no
sensible setting comes near them) and exist so that a typo or a hostile file cannot reach a
crash further on: time.sleep(), datetime arithmetic and os.posix_fallocate() overflow on the
numbers Python's integers can otherwise hold.

Standard library only, and nothing but constants: every layer may import this.
"""

from __future__ import annotations

DAY = 86400
# interval, reboot_delay and any other wait in /etc/berth/update.toml: at most 31 days.
MAX_DURATION_SECONDS = 31 * DAY
# A file in a release (manifest.json sizes) or a partition of an image: at most 1 TiB.
MAX_SIZE_BYTES = 1 << 40
# etcd-lock's slot count: how many machines of a group may reboot at once.
MAX_SLOTS = 1024
# Digits of one number written as text (a version part, a duration): int() of a few thousand
# digits raises ValueError, and of some hundreds already stands for nothing real.
MAX_DIGITS = 18
