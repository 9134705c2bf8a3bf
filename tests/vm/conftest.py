"""Every test in this directory is a VM test: it builds an image or boots one under QEMU, which
takes minutes under TCG. They all carry the `vm` marker, so that `-m "not vm"` (the fast tier)
leaves them out and `-m vm` runs them; a test module here needs no marker of its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


# tryfirst: the marker must be on the items before pytest's own `-m` selection looks at them.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The hook sees the whole session's items, not only this directory's.
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.vm)
