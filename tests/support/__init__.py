"""What tests share: fake machines, real servers, misbehaving ones, VMs and their consoles.

Every module here is a pytest plugin (`pytest_plugins` in tests/conftest.py), so the fixtures
and hooks it defines are there for every test, and a test module imports only the classes and
functions it names, never another test module or a conftest.
"""

from __future__ import annotations

from pathlib import Path

# The repository's root: images/, keys/ and the build's output directory are found from it.
REPO = Path(__file__).resolve().parent.parent.parent
