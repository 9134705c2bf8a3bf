"""The update agent end to end: a repository published by builder.publish and served by nginx,
a fake machine whose disk image has Berth's real layout, real veritysetup verification."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from builder import publish as pub
from tests.support.machine import MACHINE_ID, FakeMachine, Site, make_agent, release_manifest
from updater import files
from updater.agent import AfterBoot, Agent, SlotRole
from updater.cli import main
from updater.config import UpdateConfig
from updater.disk import bootentries, gpt, slots
from updater.disk.slots import SlotState
from updater.errors import RefusedError, UpdateError
from updater.release.channel import machine_seed
from updater.release.version import Version
from updater.update import state as state_file
from updater.update.state import load_state, state_path

V1, V2 = Version(1, 0, 0), Version(1, 1, 0)


def test_check_finds_the_candidate_and_explains_skips(site: Site, fake: FakeMachine) -> None:
    agent = make_agent(fake, site)
    site.publish(site.release("1.1.0"))
    site.publish(site.release("1.2.0"))
    pub.pull(site.repo, site.keys, "stable", Version(1, 2, 0))
    selection = agent.check()
    assert selection.release is not None and selection.release.version == V2
    assert selection.reasons == ("1.2.0: pulled",)
    state = load_state(state_path(fake.var))
    assert state.last_check is not None and state.last_check.result == "1.1.0 available"


def test_apply_installs_into_slot_b(site: Site, fake: FakeMachine) -> None:
    release = site.release("1.1.0", data_size=512 * 1024)
    site.publish(release)
    manifest = release_manifest(release)
    seen: list[tuple[str, int, int]] = []
    applied = make_agent(fake, site).apply(progress=lambda *a: seen.append(a[:3]))
    assert (applied.version, applied.slot, applied.roothash) == (V2, "B", manifest.roothash)

    # The GPT as util-linux reads it: labels from the version, UUIDs from the root hash.
    parts = fake.sfdisk()
    data_uuid, verity_uuid = gpt.uuid_pair_from_roothash(manifest.roothash)
    assert (parts[3]["name"], parts[3]["uuid"].lower()) == ("berth_1.1.0", str(data_uuid))
    assert (parts[4]["name"], parts[4]["uuid"].lower()) == ("berth_1.1.0_verity", str(verity_uuid))
    assert parts[1]["name"] == "berth_1.0.0"  # slot A untouched
    # The bytes in the slot are the release's.
    _a, b = fake.slots()
    erofs, verity = (release / "root.erofs").read_bytes(), (release / "root.verity").read_bytes()
    assert fake.region(b.data_offset, len(erofs)) == erofs
    assert fake.region(b.verity_offset, len(verity)) == verity
    assert b.state is SlotState.INSTALLED and b.roothash == manifest.roothash
    # The UKI with a boot counter, first in the boot order; the old one stays as the fallback.
    assert fake.boot_order() == ("berth_1.1.0+3.efi", "berth_1.0.0.efi")
    assert applied.entry == fake.entry_dir / "berth_1.1.0+3.efi"
    assert applied.entry.read_bytes() == (release / "uki.efi").read_bytes()
    assert not [p for p in fake.entry_dir.iterdir() if p.name.startswith(".")]
    state = load_state(state_path(fake.var))
    assert state.pending is not None and (state.pending.version, state.pending.slot) == (V2, "B")
    assert (fake.run / "reboot-required").exists()
    assert not list((fake.var / "lib/berth").glob("download-*.json"))
    # Progress went through every payload file to its end.
    done = {name: (d, t) for name, d, t in seen}
    assert done["root.erofs"] == (len(erofs), len(erofs))
    assert set(done) == {"root.erofs", "root.verity", "uki.efi"}

    status = make_agent(fake, site).status()
    assert [(s.name, s.version, s.state) for s in status.slots] == [
        ("A", "1.0.0", SlotRole.BOOTED),
        ("B", "1.1.0", SlotRole.PENDING),
    ]
    assert status.pending == "1.1.0" and status.last_result == "1.1.0 installed"


def test_status_fields(site: Site, fake: FakeMachine) -> None:
    status = make_agent(fake, site).status()
    assert (status.image, status.arch, status.booted_version) == (
        "containerhost",
        "x86_64",
        "1.0.0",
    )
    assert [(s.name, s.version, s.roothash, s.state) for s in status.slots] == [
        ("A", "1.0.0", fake.roothash, SlotRole.BOOTED),
        ("B", None, None, SlotRole.EMPTY),
    ]
    assert (status.channel, status.url, str(status.strategy)) == ("stable", site.url, "immediate")
    assert 0 <= status.seed < 2048
    assert status.last_check is None and status.pending is None and status.rollback_note is None
    assert status.boot_entries == ("berth_1.0.0.efi",)
    doc = json.loads(json.dumps(status.to_json()))
    assert doc["slots"][0] == {
        "name": "A",
        "version": "1.0.0",
        "roothash": fake.roothash,
        "state": "booted",
    }
    assert doc["seed"] == status.seed


def test_status_shows_secure_boot_and_lockdown(site: Site, fake: FakeMachine) -> None:
    from tests.support.secureboot import set_flags
    from updater.cli import format_status

    status = make_agent(fake, site).status()  # no such variables: a firmware without them
    assert status.secure_boot == "not supported by the firmware"
    assert status.lockdown == "unknown"
    set_flags(fake.efivars, SecureBoot=1, SetupMode=0)
    fake.lockdown.parent.mkdir(parents=True)
    fake.lockdown.write_text("none [integrity] confidentiality\n")
    status = make_agent(fake, site).status()
    assert (status.secure_boot, status.lockdown) == ("enabled", "integrity")
    assert "secure boot:  enabled (kernel lockdown: integrity)\n" in format_status(status)
    doc = json.loads(json.dumps(status.to_json()))
    assert (doc["secure_boot"], doc["lockdown"]) == ("enabled", "integrity")


def test_status_reads_and_never_writes(site: Site, fake: FakeMachine) -> None:
    def tree() -> dict[str, bytes | None]:
        return {
            str(p.relative_to(fake.var)): p.read_bytes() if p.is_file() else None
            for p in sorted(fake.var.rglob("*"))
        }

    agent = make_agent(fake, site)
    before = tree()
    assert agent.status().seed == machine_seed(MACHINE_ID)  # shown, not saved
    assert tree() == before
    # A saved seed that the machine id no longer gives (the id was replaced since).
    site.publish(site.release("1.1.0"))
    agent.check()
    other = "0123456789abcdef0123456789abcdef"
    fake.machine_id.write_text(other + "\n")
    before = tree()
    assert agent.status().seed == machine_seed(other)
    assert tree() == before
    # A corrupt state file stays where it is for the next check to move aside.
    state_path(fake.var).write_text("{not json")
    before = tree()
    assert agent.status().last_check is None
    assert tree() == before


def reboot_into_new(fake: FakeMachine, release: Path) -> None:
    fake.boot(V2, release_manifest(release).roothash)


def test_fallback_is_noticed_and_the_version_never_offered_again(
    site: Site, fake: FakeMachine
) -> None:
    release = site.release("1.1.0")
    site.publish(release)
    make_agent(fake, site).apply()
    # Three boots of 1.1.0 failed; systemd-boot counted them down and fell back to 1.0.0.
    entry = fake.entry_dir / "berth_1.1.0+3.efi"
    entry.rename(fake.entry_dir / "berth_1.1.0+0-3.efi")
    fake.boot(V1, fake.roothash)

    agent = make_agent(fake, site)
    result = agent.after_boot()
    assert result.rolled_back_from == (V2,)
    assert result.reasons[0].startswith("rolled back from 1.1.0: boot did not complete")
    state = load_state(state_path(fake.var))
    assert state.pending is None and V2 in state.bad_versions
    status = agent.status()
    assert status.rollback_note is not None
    assert status.rollback_note.startswith("rolled back from 1.1.0: boot did not complete")
    assert [s.state for s in status.slots] == [SlotRole.BOOTED, SlotRole.BAD]

    selection = agent.check()
    assert selection.release is None
    assert selection.reasons == ("1.1.0: marked bad on this machine",)
    with pytest.raises(RefusedError, match=r"no release newer than the booted 1\.0\.0"):
        agent.apply()
    # A second after-boot changes nothing and keeps the reason.
    assert agent.after_boot().rolled_back_from == ()
    # The operator can still ask for it explicitly.
    assert agent.apply(version=V2).version == V2
    assert V2 not in load_state(state_path(fake.var)).bad_versions


def installed_then_back_on_v1(
    site: Site, fake: FakeMachine, unloadable: tuple[str, ...] = ()
) -> AfterBoot:
    """1.1.0 installed, its entry untried, and the next boot came up on 1.0.0: the judgement."""
    site.publish(site.release("1.1.0"))
    make_agent(fake, site).apply()
    fake.boot(V1, fake.roothash, unloadable=unloadable)
    return make_agent(fake, site).after_boot()


def test_an_entry_the_loader_could_not_load_is_installed_again_not_marked_bad(
    site: Site, fake: FakeMachine
) -> None:
    # A power cut left the new entry's directory entry incomplete: systemd-boot could not load
    # it, did not list it in LoaderEntries and booted 1.0.0. That is no rollback.
    result = installed_then_back_on_v1(site, fake, unloadable=("berth_1.1.0+3.efi",))
    assert result.rolled_back_from == () and result.reasons == ()
    assert result.damaged == ("berth_1.1.0+3.efi",)
    assert fake.boot_order() == ("berth_1.0.0.efi",)
    state = load_state(state_path(fake.var))
    assert state.pending is None and V2 not in state.bad_versions
    agent = make_agent(fake, site)
    selection = agent.check()
    assert selection.release is not None and selection.release.version == V2
    assert agent.apply().version == V2
    assert fake.boot_order() == ("berth_1.1.0+3.efi", "berth_1.0.0.efi")


def test_an_untried_entry_the_loader_listed_was_passed_over_in_the_menu(
    site: Site, fake: FakeMachine
) -> None:
    result = installed_then_back_on_v1(site, fake)  # loadable, tries untouched: a menu choice
    assert result.rolled_back_from == (V2,) and result.damaged == ()
    assert "still had 3 tries left (chosen in the boot menu)" in result.reasons[0]
    assert fake.boot_order() == ("berth_1.0.0.efi", "berth_1.1.0+0.efi")


def test_without_loader_entries_every_newer_entry_counts_as_loaded(
    site: Site, fake: FakeMachine
) -> None:
    # Another boot loader sets no LoaderEntries: nothing tells a damaged entry apart.
    fake.loader_entries_missing = True
    result = installed_then_back_on_v1(site, fake, unloadable=("berth_1.1.0+3.efi",))
    assert result.rolled_back_from == (V2,) and result.damaged == ()


def test_after_boot_in_the_same_boot_as_apply_judges_nothing(site: Site, fake: FakeMachine) -> None:
    site.publish(site.release("1.1.0"))
    agent = make_agent(fake, site)
    agent.apply()
    result = agent.after_boot()
    assert result.rolled_back_from == () and result.blessed is None
    assert load_state(state_path(fake.var)).pending is not None
    assert fake.boot_order() == ("berth_1.1.0+3.efi", "berth_1.0.0.efi")


def test_good_boot_of_the_pending_version_prunes_older_ukis(site: Site, fake: FakeMachine) -> None:
    # An older leftover entry whose root is long gone: pruned after the next good boot.
    (fake.entry_dir / "berth_0.9.0.efi").write_bytes(b"old")
    release = site.release("1.1.0")
    site.publish(release)
    make_agent(fake, site).apply()
    reboot_into_new(fake, release)
    agent = make_agent(fake, site)
    on_trial = agent.after_boot()
    assert on_trial.waiting and on_trial.blessed is None
    # systemd-bless-boot drops the counter after boot-complete.target.
    (fake.entry_dir / "berth_1.1.0+2-1.efi").unlink(missing_ok=True)
    (fake.entry_dir / "berth_1.1.0+3.efi").rename(fake.entry_dir / "berth_1.1.0.efi")
    result = agent.after_boot()
    assert result.blessed == V2 and result.pruned == ("berth_0.9.0.efi",)
    assert fake.boot_order() == ("berth_1.1.0.efi", "berth_1.0.0.efi")
    assert load_state(state_path(fake.var)).pending is None
    assert [s.state for s in agent.status().slots] == [SlotRole.PREVIOUS, SlotRole.BOOTED]


def test_rollback_by_the_operator(site: Site, fake: FakeMachine) -> None:
    release = site.release("1.1.0")
    site.publish(release)
    make_agent(fake, site).apply()
    reboot_into_new(fake, release)
    (fake.entry_dir / "berth_1.1.0+3.efi").rename(fake.entry_dir / "berth_1.1.0.efi")
    agent = make_agent(fake, site)
    agent.after_boot()

    rolled = agent.rollback()
    assert (rolled.from_version, rolled.to_version) == (V2, V1)
    assert fake.boot_order() == ("berth_1.0.0.efi", "berth_1.1.0+0.efi")
    assert (fake.run / "reboot-required").exists()
    fake.boot(V1, fake.roothash)
    agent = make_agent(fake, site)
    agent.after_boot()  # keeps the operator's reason: no "boot did not complete"
    state = load_state(state_path(fake.var))
    (bad,) = state.bad
    assert (bad.version, bad.reason) == (V2, "rolled back by the operator")
    assert agent.check().release is None  # the daemon will not reinstall it

    # Nothing older than 1.0.0 in slot B now: a second rollback has nowhere to go.
    with pytest.raises(RefusedError, match=r"holds 1\.1\.0, which is not older"):
        agent.rollback()


def test_rollback_with_an_empty_other_slot_is_refused(site: Site, fake: FakeMachine) -> None:
    with pytest.raises(RefusedError, match="slot B is empty, there is no previous version"):
        make_agent(fake, site).rollback()


def test_a_second_apply_replaces_a_pending_update(site: Site, fake: FakeMachine) -> None:
    site.publish(site.release("1.1.0"))
    make_agent(fake, site).apply()
    newer = site.release("1.2.0")
    site.publish(newer)
    applied = make_agent(fake, site).apply()
    assert applied.version == Version(1, 2, 0) and applied.slot == "B"
    # 1.1.0's root is gone, so is its entry.
    assert fake.boot_order() == ("berth_1.2.0+3.efi", "berth_1.0.0.efi")
    _a, b = fake.slots()
    assert b.version == Version(1, 2, 0)


def test_apply_reads_the_state_once_and_lists_the_esp_once(
    site: Site, fake: FakeMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pending 1.1.0 in slot B, first in the boot order, replaced by 1.2.0: the pending record
    # goes before the slot becomes scratch, and 1.1.0's entry before step 5, both from one listing.
    site.publish(site.release("1.1.0"))
    make_agent(fake, site).apply()
    site.publish(site.release("1.2.0"))
    path = state_path(fake.var)
    reads: list[Path] = []
    writes: list[tuple[str, str | None]] = []  # (last check, pending) of each save
    listed_by: list[str] = []
    read_bytes, save, list_entries = (
        Path.read_bytes,
        files.write_file_atomic,
        bootentries.list_entries,
    )

    def read(self: Path) -> bytes:
        if self == path:
            reads.append(self)
        return read_bytes(self)

    def write(where: Path, data: bytes, *, mode: int = 0o644) -> None:
        doc = json.loads(data)
        writes.append((doc["last_check"]["result"], (doc["pending"] or {}).get("version")))
        save(where, data, mode=mode)

    def listing(esp: Path) -> list[bootentries.Entry]:
        listed_by.append(sys._getframe(1).f_globals["__name__"])
        return list_entries(esp)

    monkeypatch.setattr(Path, "read_bytes", read)
    monkeypatch.setattr(state_file, "write_file_atomic", write)
    monkeypatch.setattr(bootentries, "list_entries", listing)
    assert make_agent(fake, site).apply().version == Version(1, 2, 0)
    assert len(reads) == 1
    assert writes == [("1.2.0 selected for install", None), ("1.2.0 installed", "1.2.0")]
    # The second listing is staged_uki's own guard against replacing an entry of 1.2.0.
    assert listed_by == ["updater.update.install", "updater.disk.bootentries"]
    assert fake.boot_order() == ("berth_1.2.0+3.efi", "berth_1.0.0.efi")


def test_interrupted_download_resumes_with_range(site: Site, fake: FakeMachine) -> None:
    size = 2 * 1024 * 1024
    release = site.release("1.1.0", data_size=size)
    site.publish(release)
    agent = make_agent(fake, site)

    class Killed(Exception):
        pass

    def kill_midway(name: str, done: int, total: int, reused: int = 0) -> None:
        if name == "root.erofs" and done > total // 2:
            raise Killed  # the agent dies (power cut, OOM): no clean-up runs

    with pytest.raises(Killed):
        agent.apply(progress=kill_midway)
    _a, b = fake.slots()
    assert b.state is SlotState.WRITING
    saved = json.loads((fake.var / "lib/berth/download-root.erofs.json").read_text())["done"]
    assert 0 < saved < size

    make_agent(fake, site).apply()
    erofs_path = f"/{site.payload(release, 'root.erofs').relative_to(site.repo)}"
    gets = [r for r in site.server.requests() if r.path == erofs_path and "GET" in r.request]
    assert [(r.status, r.range) for r in gets] == [(200, None), (206, f"bytes={saved}-")]
    assert gets[1].body_bytes == size - saved
    _a, b = fake.slots()
    assert b.state is SlotState.INSTALLED and b.version == V2
    # The slot verifies (apply did it too; this is the check done independently).
    slots.verify_slot(fake.disk, b, release_manifest(release).roothash, size)


class FakeAgent(Agent):
    def __init__(self, error: UpdateError | None = None) -> None:
        self.error = error

    def check(self, *, ignore_waves: bool = False) -> object:  # type: ignore[override]
        if self.error is not None:
            raise self.error
        raise AssertionError("not reached")


def test_cli_status_json_and_text(site: Site, fake: FakeMachine) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert main(["status", "--json"], agent_factory=lambda: make_agent(fake, site), out=out) == 0
    assert json.loads(out.getvalue())["slots"][1]["state"] == "empty"
    out = io.StringIO()
    assert main(["status"], agent_factory=lambda: make_agent(fake, site), out=out, err=err) == 0
    assert "booted:       containerhost 1.0.0 (x86_64)" in out.getvalue()
    assert "slot B:       - empty" in out.getvalue()


def test_cli_apply_and_check_output(site: Site, fake: FakeMachine) -> None:
    site.publish(site.release("1.1.0"))
    out, err = io.StringIO(), io.StringIO()
    assert main(["check"], agent_factory=lambda: make_agent(fake, site), out=out, err=err) == 0
    assert out.getvalue() == "update available: 1.1.0\n"
    out = io.StringIO()
    assert main(["apply"], agent_factory=lambda: make_agent(fake, site), out=out, err=err) == 0
    assert out.getvalue().startswith("installed 1.1.0 into slot B (berth_1.1.0+3.efi)")
    # Not a terminal: plain progress lines, ending at 100% for each file.
    lines = err.getvalue().splitlines()
    assert "root.erofs: 100% (0.3 MB of 0.3 MB)" in lines and "\r" not in err.getvalue()


def test_cli_errors_are_one_line_and_exit_1() -> None:
    out, err = io.StringIO(), io.StringIO()
    code = main(
        ["check"], agent_factory=lambda: FakeAgent(UpdateError("refused x: y")), out=out, err=err
    )
    assert (code, err.getvalue(), out.getvalue()) == (1, "berth-update: refused x: y\n", "")


def test_cli_argument_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["apply", "--version", "1.2"], agent_factory=FakeAgent)
    assert exit_info.value.code == 2
    assert "is not MAJOR.MINOR.PATCH" in capsys.readouterr().err


def test_progress_bar_on_a_terminal() -> None:
    from updater.progress import Progress

    stream = io.StringIO()
    bar = Progress(stream, tty=True, width=10)
    bar("root.erofs", 5_000_000, 10_000_000)
    bar("root.erofs", 10_000_000, 10_000_000)
    bar.close()
    text = stream.getvalue()
    assert "\rroot.erofs   [█████·····]  50% 5.0 MB of 10.0 MB" in text
    assert text.endswith("[██████████] 100% 10.0 MB of 10.0 MB\n")


def test_entries_helper_matches_loader(fake: FakeMachine) -> None:
    # The fake loader variable names the booted entry the way systemd-boot does.
    assert bootentries.booted_version(fake.loader_entry) == V1


def test_no_repository_configured_is_refused_but_status_works(
    site: Site, fake: FakeMachine
) -> None:
    agent = Agent(fake.machine(site.keys / "root.json"), UpdateConfig(url="", channel="stable"))
    assert agent.status().booted_version is not None
    with pytest.raises(RefusedError, match="no update repository is configured"):
        agent.check()
