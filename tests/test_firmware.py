"""updater.disk.firmware: Secure Boot and lockdown as the firmware and the kernel report them,
and as `berth-update status` shows them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.secureboot import ATTRIBUTES, set_flags
from updater.disk import firmware
from updater.disk.firmware import SecureBoot


def variables(tmp_path: Path, **values: int) -> Path:
    efivars = tmp_path / "efivars"
    set_flags(efivars, **values)
    return efivars


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"SecureBoot": 1, "SetupMode": 0}, SecureBoot.ENABLED),
        ({"SecureBoot": 0, "SetupMode": 0}, SecureBoot.DISABLED),
        ({"SecureBoot": 0, "SetupMode": 1}, SecureBoot.SETUP_MODE),
        ({"SecureBoot": 0}, SecureBoot.DISABLED),
        ({}, SecureBoot.NO_FIRMWARE_SUPPORT),
    ],
)
def test_secure_boot_state_from_the_efi_variables(
    tmp_path: Path, values: dict[str, int], expected: SecureBoot
) -> None:
    assert firmware.secure_boot(variables(tmp_path, **values)) is expected


def test_a_machine_without_efi_variables_says_so(tmp_path: Path) -> None:
    assert firmware.secure_boot(tmp_path / "absent") is SecureBoot.NOT_UEFI


def test_a_malformed_variable_is_not_taken_for_a_state(tmp_path: Path) -> None:
    efivars = variables(tmp_path)
    (efivars / f"SecureBoot-{firmware.GLOBAL_GUID}").write_bytes(ATTRIBUTES + b"\x01\x00")
    assert firmware.secure_boot(efivars) is SecureBoot.NO_FIRMWARE_SUPPORT


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("[none] integrity confidentiality\n", "none"),
        ("none [integrity] confidentiality\n", "integrity"),
        ("none integrity [confidentiality]\n", "confidentiality"),
        ("garbage\n", "unknown"),
    ],
)
def test_lockdown_mode_is_the_bracketed_one(tmp_path: Path, text: str, mode: str) -> None:
    path = tmp_path / "lockdown"
    path.write_text(text)
    assert firmware.lockdown(path) == mode


def test_lockdown_without_securityfs_is_unknown(tmp_path: Path) -> None:
    assert firmware.lockdown(tmp_path / "absent") == "unknown"
