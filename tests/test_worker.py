"""The daemon's worker: results, errors and crashes of a forked child come back to the parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import requests

from tests.support import REPO
from updater.errors import UpdateError, VerificationError
from updater.service.worker import WorkerBug, run_in_child


def test_the_result_comes_back_and_the_work_ran_elsewhere() -> None:
    assert run_in_child(lambda: (os.getpid(), {"version": "1.2.0"}))[1] == {"version": "1.2.0"}
    assert run_in_child(os.getpid) != os.getpid()


def test_errors_a_later_attempt_may_fix_become_update_errors() -> None:
    def refused() -> None:
        raise VerificationError("refused root.erofs: hash mismatch")

    def network() -> None:
        requests.get("http://127.0.0.1:9/", timeout=1)

    with pytest.raises(UpdateError, match="hash mismatch"):
        run_in_child(refused)
    with pytest.raises(UpdateError, match="Connection refused"):
        run_in_child(network)


def test_a_bug_in_the_child_is_not_mistaken_for_a_transient_error() -> None:
    def bug() -> None:
        raise KeyError("slot")

    with pytest.raises(WorkerBug, match="KeyError: 'slot'"):
        run_in_child(bug)


def test_a_child_that_dies_without_reporting_is_an_error_naming_how() -> None:
    with pytest.raises(UpdateError, match="killed by signal SIGKILL"):
        run_in_child(lambda: os.kill(os.getpid(), signal.SIGKILL))
    with pytest.raises(UpdateError, match="exited with status 3"):
        run_in_child(lambda: os._exit(3))


def test_the_resident_daemon_does_not_import_the_heavy_modules() -> None:
    """What keeps the idle daemon small (bench/bench_apply.py measures its memory)."""
    code = (
        "import pickle, sys, updater.cli, updater.service.daemon\n"
        # What a worker sends back must not pull the agent in when it is unpickled.
        "j = updater.service.daemon.Judgement('1.0.0', ('r',), '1.0.0', ('e',), False)\n"
        "assert pickle.loads(pickle.dumps(j)) == j\n"
        "heavy = [m for m in ('requests', 'urllib3', 'tuf', 'securesystemslib', 'cryptography')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == ""
