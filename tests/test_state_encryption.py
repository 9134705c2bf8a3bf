"""An encrypted STATE, outside a VM: the image option, the PCR key, what status says, and the
rollback reason a boot that could not unlock STATE leaves in an EFI variable.

The initrd's side (LUKS2 at first boot, TPM2 unlock, the console) runs in
tests/vm/test_encryption_vm.py under swtpm.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from builder.config import Encryption, load_image
from builder.errors import ConfigError, PublishError
from builder.image import encryption_settings
from builder.publish import pcrkey
from cli.main import main
from tests.support import REPO
from tests.support.machine import FakeMachine, Site, make_agent
from updater.cli import format_status
from updater.disk import encryption
from updater.release.version import Version

V1, V2 = Version(1, 0, 0), Version(1, 1, 0)


# The image option


def _images(tmp_path: Path, text: str) -> Path:
    (tmp_path / "overlays").mkdir(parents=True)
    images = tmp_path / "images"
    images.mkdir()
    (images / "mine.toml").write_text(text)
    return images


def test_encrypt_defaults_to_auto_and_each_choice_is_read(tmp_path: Path) -> None:
    assert load_image("containerhost", REPO / "images").encrypt is Encryption.AUTO
    for choice in Encryption:
        images = _images(
            tmp_path / str(choice), f'encrypt = "{choice}"\nencrypt_bind_pcr7 = true\n'
        )
        config = load_image("mine", images)
        assert (config.encrypt, config.encrypt_bind_pcr7) == (choice, True)
    settings = encryption_settings(config)
    assert "ENCRYPT=off\n" in settings and "TPM2_PCRS=7\n" in settings
    plain = load_image("containerhost", REPO / "images")
    assert "ENCRYPT=auto\nTPM2_PCRS=\n" in encryption_settings(plain)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('encrypt = "luks"', r"images/mine\.toml: key 'encrypt': expected one of \"auto\", "),
        ("encrypt = true", r"key 'encrypt': expected a string, got a boolean"),
        (
            'encrypt_bind_pcr7 = "yes"',
            r"key 'encrypt_bind_pcr7': expected true or false, got a str",
        ),
        ('encrypted = "tpm2"', r"unknown key 'encrypted': did you mean 'encrypt'\?"),
    ],
)
def test_a_wrong_encrypt_option_names_the_file_and_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    images = _images(tmp_path, text + "\n")
    with pytest.raises(ConfigError, match=message):
        load_image("mine", images)


# The PCR key


def test_pcr_key_is_made_once_private_and_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    assert main(["keys", "init", "--keys", str(keys)]) == 0
    directory = pcrkey.pcr_dir(keys)
    assert (directory / pcrkey.PRIVATE).stat().st_mode & 0o777 == 0o600
    assert (directory / pcrkey.PUBLIC).stat().st_mode & 0o777 == 0o644
    assert directory.stat().st_mode & 0o777 == 0o700
    assert b"BEGIN PUBLIC KEY" in (directory / pcrkey.PUBLIC).read_bytes()
    before = (directory / pcrkey.PRIVATE).read_bytes()
    assert not pcrkey.init_pcr_key(keys)  # never overwritten
    assert (directory / pcrkey.PRIVATE).read_bytes() == before
    capsys.readouterr()
    assert main(["keys", "show", "--keys", str(keys)]) == 0
    assert "pcr key    RSA 2048 sha256:" in capsys.readouterr().out
    # An older keys directory without a PCR key: init adds just that.
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()
    assert main(["keys", "init", "--keys", str(keys)]) == 0
    assert pcrkey.has_pcr_key(keys)
    # Offline private key: shown as such.
    (directory / pcrkey.PRIVATE).unlink()
    described = pcrkey.describe_pcr_key(keys)
    assert described is not None and described.private is None
    assert "PRIVATE KEY OFFLINE" in described.describe()


def test_a_pcr_key_pair_that_does_not_match_or_leaks_is_refused(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    pcrkey.init_pcr_key(one)
    pcrkey.init_pcr_key(two)
    os.replace(pcrkey.pcr_dir(two) / pcrkey.PUBLIC, pcrkey.pcr_dir(one) / pcrkey.PUBLIC)
    with pytest.raises(PublishError, match="does not belong to"):
        pcrkey.describe_pcr_key(one)
    (pcrkey.pcr_dir(two) / pcrkey.PRIVATE).chmod(0o644)
    pcrkey.pcr_dir(two).joinpath(pcrkey.PUBLIC).write_bytes(b"")  # rewritten below
    pcrkey.pcr_dir(two).joinpath(pcrkey.PUBLIC).unlink()
    with pytest.raises(PublishError, match="without"):
        pcrkey.init_pcr_key(two)


def test_a_pcr_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    pcrkey.init_pcr_key(tmp_path)
    (pcrkey.pcr_dir(tmp_path) / pcrkey.PRIVATE).chmod(0o640)
    with pytest.raises(PublishError, match="group can read it"):
        pcrkey.describe_pcr_key(tmp_path)


# What status says


def _report(fake: FakeMachine, **doc: object) -> None:
    path = fake.run / "berth/state.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def _tpm(fake: FakeMachine, major: str) -> None:
    (fake.tpm_class / "tpm0").mkdir(parents=True)
    (fake.tpm_class / "tpm0/tpm_version_major").write_text(major + "\n")


def test_status_says_whether_state_is_encrypted_and_how(site: Site, fake: FakeMachine) -> None:
    status = make_agent(fake, site).status()
    assert status.state_encrypted is None and status.tpm == "none"
    assert status.state_encryption.startswith("unknown")

    _report(
        fake,
        mode="auto",
        tpm=False,
        encrypted=False,
        binding="none",
        note="no TPM 2.0 at first boot",
    )
    status = make_agent(fake, site).status()
    assert status.state_encryption == "not encrypted (no TPM 2.0 at first boot)"
    assert "state:        not encrypted (no TPM 2.0 at first boot)\n" in format_status(status)
    assert "tpm:          none\n" in format_status(status)

    _tpm(fake, "2")
    _report(fake, mode="auto", tpm=True, encrypted=True, binding="tpm2-pcr11-signed+pcr7", note="")
    status = make_agent(fake, site).status()
    assert status.tpm == "TPM 2.0"
    assert status.state_encrypted is True
    assert status.state_binding == "tpm2-pcr11-signed+pcr7"
    assert status.state_encryption == (
        "LUKS2, unlocked by the TPM: PCR 11 as signed by the build's PCR key, and PCR 7 "
        "(the Secure Boot state)"
    )
    doc = json.loads(json.dumps(status.to_json()))
    assert (doc["state_encrypted"], doc["tpm"]) == (True, "TPM 2.0")

    # Malformed reports read as unknown, never as "not encrypted".
    for bad in (b"{not json", b"[]", b'{"encrypted": "yes"}', b"\xff" * 10):
        (fake.run / "berth/state.json").write_bytes(bad)
        assert make_agent(fake, site).status().state_encrypted is None


# The rollback reason


def _unlock_variable(fake: FakeMachine, text: bytes) -> Path:
    fake.efivars.mkdir(parents=True, exist_ok=True)
    path = fake.efivars / encryption.UNLOCK_VARIABLE
    path.write_bytes(b"\x07\x00\x00\x00" + text)
    return path


def _installed_and_tries_ran_out(site: Site, fake: FakeMachine) -> None:
    site.publish(site.release("1.1.0"))
    make_agent(fake, site).apply()
    (fake.entry_dir / "berth_1.1.0+3.efi").rename(fake.entry_dir / "berth_1.1.0+0-3.efi")


def test_a_release_that_could_not_unlock_state_rolls_back_with_that_reason(
    site: Site, fake: FakeMachine
) -> None:
    # 1.1.0's initrd could not unlock STATE on each of its tries, and said why before failing.
    _installed_and_tries_ran_out(site, fake)
    variable = _unlock_variable(
        fake,
        b"1.1.0\nthis release's UKI is signed with another PCR key than the one STATE was "
        b"sealed to\n",
    )
    fake.boot(V1, fake.roothash)
    agent = make_agent(fake, site)
    result = agent.after_boot()
    assert result.rolled_back_from == (V2,)
    assert result.reasons == (
        "rolled back from 1.1.0: STATE could not be unlocked: this release's UKI is signed with "
        "another PCR key than the one STATE was sealed to",
    )
    assert not variable.exists()  # recorded, then cleared
    status = agent.status()
    assert status.rollback_note == result.reasons[0]


def test_an_unlock_reason_of_another_version_or_malformed_is_not_used(
    site: Site, fake: FakeMachine
) -> None:
    _installed_and_tries_ran_out(site, fake)
    _unlock_variable(fake, b"0.9.0\nan old failure\n")
    fake.boot(V1, fake.roothash)
    result = make_agent(fake, site).after_boot()
    assert result.reasons[0].startswith("rolled back from 1.1.0: boot did not complete")
    for raw in (b"", b"\x07\x00", b"\x07\x00\x00\x001.1.0", b"\x07\x00\x00\x00\n\nreason\n"):
        (fake.efivars / encryption.UNLOCK_VARIABLE).write_bytes(raw)
        assert encryption.unlock_failure(fake.efivars) is None
