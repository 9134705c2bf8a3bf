"""updater/run.py, the one way the device runs a command: real commands, real timeouts; then
what each call site makes of a command that fails, hangs or is missing."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from updater import run
from updater.disk import bootentries, slots
from updater.errors import (
    BootEntryError,
    CommandError,
    CommandTimeout,
    SlotError,
    ToolMissing,
    UpdateError,
)
from updater.provision.apply import run_command, run_commands
from updater.provision.plan import Command, Plan, ProvisionError
from updater.service import daemon, health, notice


def gone(pid: int, within: float = 5.0) -> bool:
    """Whether `pid` has exited (reaped, or a zombie nobody reaped yet) within `within` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def stand_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, body: str) -> Path:
    """A shell script called `name` that updater.run finds before the system's tool."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / name
    tool.write_text("#!/bin/sh\n" + body + "\n")
    tool.chmod(0o755)
    monkeypatch.setattr(run, "PATH", f"{bin_dir}:{run.PATH}")
    return tool


def test_output_and_status_come_back() -> None:
    done = run.run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (3, b"out\n", b"err\n")
    assert done.argv == ("sh", "-c", "echo out; echo err >&2; exit 3")


def test_arguments_are_never_a_shell_line() -> None:
    done = run.run(["echo", "$PATH; exit 7", "*"], timeout=10)
    assert done.stdout == b"$PATH; exit 7 *\n"


def test_a_failure_carries_the_command_status_and_stderr() -> None:
    with pytest.raises(CommandError) as e:
        run.run(["sh", "-c", "echo ignored; echo 'disk is sad' >&2; exit 3"], timeout=10)
    assert str(e.value) == (
        "sh -c 'echo ignored; echo '\"'\"'disk is sad'\"'\"' >&2; exit 3' failed with exit "
        "status 3: disk is sad"
    )
    assert isinstance(e.value, UpdateError)
    assert (e.value.status, e.value.stdout, e.value.stderr) == (3, b"ignored\n", b"disk is sad\n")


def test_only_the_tail_of_a_long_stderr_is_in_the_message() -> None:
    with pytest.raises(CommandError) as e:
        run.run(["sh", "-c", "seq 1 500 >&2; exit 1"], timeout=10)
    message = str(e.value)
    assert message.endswith(": " + "\n".join(str(n) for n in range(491, 501)))
    assert "\n490" not in message
    assert e.value.stderr.count(b"\n") == 500  # the whole of it stays on the exception


def test_a_command_killed_by_a_signal_says_which() -> None:
    with pytest.raises(
        CommandError, match=r"^sh -c 'kill -SEGV \$\$' was killed by signal SIGSEGV$"
    ):
        run.run(["sh", "-c", "kill -SEGV $$"], timeout=10)


def test_stdout_stands_in_for_an_empty_stderr() -> None:
    with pytest.raises(CommandError, match=r"exit status 2: said on stdout$"):
        run.run(["sh", "-c", "echo said on stdout; exit 2"], timeout=10)


def test_a_missing_tool_is_named_with_where_it_was_looked_for() -> None:
    with pytest.raises(ToolMissing) as e:
        run.run(["berth-no-such-tool", "--flag"], timeout=10)
    assert str(e.value) == "berth-no-such-tool not found in /usr/sbin:/usr/bin:/sbin:/bin"
    assert isinstance(e.value, CommandError) and e.value.status is None
    with pytest.raises(ToolMissing, match=r"^/nonexistent/bootctl not found$"):
        run.run(["/nonexistent/bootctl"], timeout=10)


def test_a_file_that_cannot_run_is_named(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(ToolMissing, match="plain is not an executable file"):
        run.run([plain], timeout=10)
    broken = tmp_path / "broken"
    broken.write_text("#!/nonexistent/interpreter\n")
    broken.chmod(0o755)
    with pytest.raises(CommandError, match=r"broken could not be started: No such file"):
        run.run([broken], timeout=10)


def test_tools_are_looked_up_in_the_fixed_path_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = stand_in(monkeypatch, tmp_path, "berth-test-tool", "echo mine")
    assert run.find_tool("berth-test-tool") == str(tool)
    assert run.run(["berth-test-tool"], timeout=10).stdout == b"mine\n"
    # The caller's own PATH plays no part.
    monkeypatch.setattr(run, "PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    monkeypatch.setenv("PATH", f"{tool.parent}:/usr/bin:/bin")
    with pytest.raises(ToolMissing):
        run.run(["berth-test-tool"], timeout=10)


def test_the_environment_is_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    seen = run.run(["env"], timeout=10).stdout.decode()
    assert sorted(seen.splitlines()) == ["LANG=C.UTF-8", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
    seen = run.run(["env"], timeout=10, env={"SYSTEMD_LOG_LEVEL": "debug"}).stdout.decode()
    assert sorted(seen.splitlines()) == [
        "LANG=C.UTF-8",
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        "SYSTEMD_LOG_LEVEL=debug",
    ]


def test_input_is_passed_and_stdin_is_otherwise_empty() -> None:
    assert run.run(["cat"], input=b"to every terminal\n", timeout=10).stdout == (
        b"to every terminal\n"
    )
    # Without input, stdin is /dev/null: cat ends at once instead of waiting for a terminal.
    assert run.run(["cat"], timeout=10).stdout == b""


def test_combined_output_keeps_the_order_written() -> None:
    done = run.run(
        ["sh", "-c", "echo one; echo two >&2; echo three"],
        timeout=10,
        output=run.Output.COMBINED,
    )
    assert (done.stdout, done.stderr) == (b"one\ntwo\nthree\n", b"")


def test_inherited_output_goes_where_ours_goes(capfd: pytest.CaptureFixture[str]) -> None:
    done = run.run(
        ["sh", "-c", "echo to the console; echo to the journal >&2"],
        timeout=10,
        output=run.Output.INHERIT,
    )
    assert (done.stdout, done.stderr) == (b"", b"")
    out, err = capfd.readouterr()
    assert (out, err) == ("to the console\n", "to the journal\n")


def test_a_timeout_kills_the_command_and_what_it_started() -> None:
    start = time.monotonic()
    with pytest.raises(CommandTimeout) as e:
        run.run(["sh", "-c", "sleep 300 & echo $!; sleep 300"], timeout=0.5)
    assert time.monotonic() - start < 5
    child = int(e.value.stdout.decode())
    assert gone(child), f"the background sleep {child} outlived the timeout"
    assert str(e.value).startswith("sh -c 'sleep 300 & echo $!; sleep 300' did not finish")
    assert str(e.value).endswith(f"within 0.5 s: {child}")
    assert e.value.timeout == 0.5 and e.value.status is None


def test_a_timeout_does_not_wait_for_a_process_that_left_the_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A grandchild in a session of its own survives the kill and holds the pipe open."""
    monkeypatch.setattr(run, "KILL_GRACE", 0.2)
    start = time.monotonic()
    with pytest.raises(CommandTimeout) as e:
        run.run(["sh", "-c", "setsid sleep 30 & echo $!; sleep 300"], timeout=0.5)
    escaped = int(e.value.stdout.decode())
    try:
        assert time.monotonic() - start < 5
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(escaped, signal.SIGKILL)


# The call sites: what they make of a command that fails, hangs or is missing


def test_find_esp_asks_bootctl_and_reports_what_it_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stand_in(monkeypatch, tmp_path, "bootctl", 'test "$1" = --print-esp-path && echo /efi')
    assert bootentries.find_esp() == Path("/efi")
    stand_in(
        monkeypatch, tmp_path, "bootctl", 'echo "Couldn\'t find EFI system partition." >&2; exit 1'
    )
    with pytest.raises(BootEntryError) as e:
        bootentries.find_esp()
    assert str(e.value) == (
        "cannot find the ESP: bootctl --print-esp-path failed with exit status 1: "
        "Couldn't find EFI system partition."
    )


def test_find_esp_without_bootctl_names_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(run, "PATH", str(tmp_path))
    with pytest.raises(BootEntryError) as e:
        bootentries.find_esp()
    assert str(e.value) == f"cannot find the ESP: bootctl not found in {tmp_path}"


def test_verifying_without_veritysetup_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, tree = tmp_path / "data", tmp_path / "tree"
    data.write_bytes(bytes(4096))
    tree.write_bytes(bytes(4096))
    monkeypatch.setattr(slots, "_check_superblock", lambda *_: None)
    monkeypatch.setattr(run, "PATH", str(tmp_path))
    with pytest.raises(SlotError) as e:
        slots.verify_verity(data, tree, "0" * 64, 4096)
    assert str(e.value) == (
        f"cannot verify the slot: veritysetup not found in {tmp_path} (package cryptsetup-bin)"
    )


def test_a_reboot_command_that_fails_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stand_in(
        monkeypatch, tmp_path, "systemctl", "echo 'Failed to reboot: Access denied' >&2; exit 1"
    )
    with pytest.raises(UpdateError) as e:
        daemon.run_command(daemon.REBOOT_COMMAND)()
    assert str(e.value) == "cannot reboot with systemctl reboot: Failed to reboot: Access denied"
    with pytest.raises(UpdateError, match=r"^cannot reboot with no-reboot: no-reboot not found in"):
        daemon.run_command(["no-reboot"])()


def test_systemctl_for_the_health_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in(monkeypatch, tmp_path, "systemctl", 'echo "$@"')
    assert health.systemctl(["list-jobs", "--plain"]) == "list-jobs --plain\n"
    stand_in(monkeypatch, tmp_path, "systemctl", "echo 'Failed to connect to bus' >&2; exit 1")
    with pytest.raises(health.HealthError) as e:
        health.systemctl(["list-jobs"])
    assert str(e.value) == "systemctl list-jobs failed with exit status 1: Failed to connect to bus"


def test_a_hung_loginctl_does_not_hold_the_reboot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notice, "TIMEOUT", 0.3)
    loginctl = stand_in(monkeypatch, tmp_path, "loginctl", "sleep 300")
    start = time.monotonic()
    assert notice.count_sessions([str(loginctl)]) is None  # unknown: warned anyway
    notice.warn_users("rebooting", [str(loginctl)])  # logged, not raised
    assert time.monotonic() - start < 5


def test_a_runcmd_program_that_is_missing_fails_its_entry(tmp_path: Path) -> None:
    plan = Plan(
        source="user-data", format="cloud-config", commands=(Command(argv=("berth-none",)),)
    )
    with pytest.raises(ProvisionError) as e:
        run_commands(plan, tmp_path)
    assert str(e.value) == (
        "user-data: runcmd[0] failed: berth-none not found in /usr/sbin:/usr/bin:/sbin:/bin"
    )


def test_runcmd_sees_only_the_clean_environment(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    run_command(["env"])
    assert sorted(capfd.readouterr().out.splitlines()) == [
        "LANG=C.UTF-8",
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
    ]
