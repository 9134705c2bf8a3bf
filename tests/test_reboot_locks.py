"""Reboot locks against a real etcd: airlock's semaphore, fifty contending agents, a killed
holder, berth-lockd (two replicas) with the FleetLock client, and the operator commands."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from qemu.vm import free_port
from tests.support import REPO
from tests.support.etcd import EtcdServer
from updater.cli import main as berth_update
from updater.reboot.etcdlock import EtcdStore
from updater.reboot.fleetlock import FleetLockClient
from updater.reboot.lockd import LockServer
from updater.reboot.semaphore import LockError, Semaphore, SemaphoreClient, semaphore_key


def raw_get(server: EtcdServer, key: str) -> dict[str, object] | None:
    """The key as etcd's gateway returns it, bypassing Berth's store code."""
    doc = requests.post(
        server.url + "/v3/kv/range", json={"key": base64.b64encode(key.encode()).decode()}
    ).json()
    kvs = doc.get("kvs")
    return kvs[0] if kvs else None


def raw_put(server: EtcdServer, key: str, value: str) -> None:
    requests.post(
        server.url + "/v3/kv/put",
        json={
            "key": base64.b64encode(key.encode()).decode(),
            "value": base64.b64encode(value.encode()).decode(),
        },
    ).raise_for_status()


def test_airlock_layout_recursive_lock_and_compare_and_swap(etcd: EtcdServer) -> None:
    sem = SemaphoreClient(EtcdStore([etcd.url]), "layout", default_slots=2)
    key = "com.coreos.airlock/groups/layout/v1/semaphore"
    assert sem.key == key == semaphore_key("layout")
    assert raw_get(etcd, key) is None
    assert sem.acquire("b").ok and sem.acquire("a").ok
    kv = raw_get(etcd, key)
    assert kv is not None
    # Exactly what airlock writes (Go's encoding/json of its Semaphore struct, holders sorted).
    assert base64.b64decode(str(kv["value"])) == b'{"total_slots":2,"holders":["a","b"]}'
    revision = kv["mod_revision"]
    again = sem.acquire("a")  # recursive: granted without a write
    assert again.ok and not again.changed
    assert raw_get(etcd, key) == kv
    full = sem.acquire("c")
    assert not full.ok and not full.changed and full.semaphore.holders == ("a", "b")
    assert sem.release("a").changed and not sem.release("a").changed
    assert sem.acquire("c").ok
    kv = raw_get(etcd, key)
    assert kv is not None and int(str(kv["mod_revision"])) > int(str(revision))
    # A stale compare-and-swap is refused and answers with the current value.
    store = EtcdStore([etcd.url])
    conflict = store.compare_and_swap(key, int(str(revision)), b'{"total_slots":9,"holders":[]}')
    assert conflict is not None
    assert Semaphore.parse(conflict.value or b"", key) == Semaphore(2, ("b", "c"))


def test_reads_what_airlock_wrote(etcd: EtcdServer) -> None:
    key = semaphore_key("airlock")
    raw_put(etcd, key, '{"total_slots":1,"holders":null}')  # Go's nil slice
    sem = SemaphoreClient(EtcdStore([etcd.url]), "airlock", default_slots=5)
    assert sem.show() == (Semaphore(1), True)  # an existing semaphore keeps its own count
    assert sem.acquire("x").ok and not sem.acquire("y").ok
    raw_put(etcd, key, '{"total_slots": "two"}')
    with pytest.raises(LockError, match="expected"):
        sem.acquire("z")


def test_unreachable_etcd_is_a_lock_error_naming_every_endpoint() -> None:
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    store = EtcdStore(dead, timeout=(0.5, 0.5))
    with pytest.raises(LockError, match="no etcd endpoint answered") as info:
        SemaphoreClient(store, "g").acquire("a")
    assert all(d in str(info.value) for d in dead)


def test_second_endpoint_is_used_when_the_first_is_down(etcd: EtcdServer) -> None:
    store = EtcdStore([f"http://127.0.0.1:{free_port()}", etcd.url], timeout=(0.5, 1.0))
    assert SemaphoreClient(store, "failover").acquire("a").ok


class Watcher:
    """Polls the semaphore on its own connection while agents contend; records the maximum."""

    def __init__(self, read: Callable[[], Semaphore]) -> None:
        self.read = read
        self.max_held = 0
        self.violations: list[Semaphore] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            s = self.read()
            self.samples += 1
            self.max_held = max(self.max_held, len(s.holders))
            if len(s.holders) > s.total_slots:
                self.violations.append(s)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def contend(
    agents: int,
    slots: int,
    acquire: Callable[[str], bool],
    release: Callable[[str], object],
) -> tuple[dict[str, int], int]:
    """`agents` threads each ask for a slot until granted, "reboot" while holding it, release.

    Returns the reboots per agent and the most agents that believed they held a slot at once.
    """
    reboots = {f"agent-{i:02d}": 0 for i in range(agents)}
    inside = 0
    most = 0
    guard = threading.Lock()
    start = threading.Barrier(agents)
    errors: list[BaseException] = []

    def agent(name: str) -> None:
        nonlocal inside, most
        rng = random.Random(name)
        try:
            start.wait()
            while not acquire(name):
                time.sleep(rng.uniform(0.005, 0.02))
            with guard:
                inside += 1
                most = max(most, inside)
            time.sleep(rng.uniform(0.01, 0.03))  # the reboot
            with guard:
                inside -= 1
                reboots[name] += 1
            release(name)
        except BaseException as e:  # a failing agent must fail the test, not hang it
            errors.append(e)

    threads = [threading.Thread(target=agent, args=(name,)) for name in reboots]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    return reboots, most


def _hold_forever(url: str, group: str, holder: str) -> subprocess.Popen[str]:
    """A separate process that takes a slot with the real code and then hangs, to be killed."""
    code = (
        "import sys, time\n"
        "from updater.reboot.etcdlock import EtcdStore\n"
        "from updater.reboot.semaphore import SemaphoreClient\n"
        f"ok = SemaphoreClient(EtcdStore([{url!r}]), {group!r}, 3).acquire({holder!r}).ok\n"
        "print('held' if ok else 'refused', flush=True)\n"
        "time.sleep(600)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )


def test_fifty_agents_never_exceed_the_slots_and_a_killed_holder_is_releasable(
    etcd: EtcdServer,
) -> None:
    group, slots = "fleet", 3
    # A machine takes a slot and dies before it can give it back (power loss mid-reboot).
    dead = _hold_forever(etcd.url, group, "dead-machine")
    assert dead.stdout is not None and dead.stdout.readline().strip() == "held"
    dead.send_signal(signal.SIGKILL)
    dead.wait()

    def client() -> SemaphoreClient:
        return SemaphoreClient(EtcdStore([etcd.url]), group, slots)

    local = threading.local()

    def mine() -> SemaphoreClient:  # one connection per agent, as on separate machines
        if not hasattr(local, "sem"):
            local.sem = client()
        sem: SemaphoreClient = local.sem
        return sem

    watcher_sem = client()
    began = time.monotonic()
    with Watcher(lambda: watcher_sem.show()[0]) as watcher:
        reboots, most = contend(
            50, slots - 1, lambda n: mine().acquire(n).ok, lambda n: mine().release(n)
        )
    elapsed = time.monotonic() - began
    assert set(reboots.values()) == {1}  # every agent rebooted, exactly once
    assert not watcher.violations and watcher.samples > 10
    # The dead machine still holds its slot: the living share the other two.
    assert watcher.max_held <= slots and most <= slots - 1
    assert most == slots - 1  # and they did use both
    assert elapsed < 20

    # The operator sees the dead holder and frees its slot.
    out = io.StringIO()
    assert berth_update(["lock", "--etcd", etcd.url, "--group", group, "show"], out=out) == 0
    assert out.getvalue() == (
        f"group {group} ({semaphore_key(group)}): 1 of 3 slots held\n  dead-machine\n"
    )
    out = io.StringIO()
    args = ["lock", "--etcd", etcd.url, "--group", group]
    assert berth_update([*args, "release", "dead-machine"], out=out) == 0
    assert "released dead-machine" in out.getvalue()
    err = io.StringIO()
    assert berth_update([*args, "release", "dead-machine"], out=out, err=err) == 1
    assert "dead-machine holds no slot" in err.getvalue()
    out = io.StringIO()
    assert berth_update([*args, "slots", "5"], out=out) == 0
    assert "3 -> 5 slots, 0 held" in out.getvalue()
    out = io.StringIO()
    assert berth_update([*args, "show", "--json"], out=out) == 0
    assert json.loads(out.getvalue())["total_slots"] == 5


@pytest.fixture
def replicas(etcd: EtcdServer) -> Iterator[tuple[str, str]]:
    """Two berth-lockd replicas on one etcd: one as its real command line, one in-process."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "updater.reboot.lockd",
            "--etcd",
            etcd.url,
            "--listen",
            f"127.0.0.1:{port}",
            "--slots",
            "2",
        ],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    inner = LockServer(("127.0.0.1", 0), EtcdStore([etcd.url]), 2).start()
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 10
    while True:
        try:
            requests.post(url + "v1/steady-state", timeout=1)
            break
        except requests.ConnectionError:
            assert process.poll() is None and time.monotonic() < deadline, "lockd did not start"
            time.sleep(0.05)
    yield url, inner.url
    inner.stop()
    process.terminate()
    _, stderr = process.communicate(timeout=10)
    assert "serving FleetLock on http://127.0.0.1:" in stderr


def test_lockd_replicas_share_one_semaphore(replicas: tuple[str, str], etcd: EtcdServer) -> None:
    a, b = replicas

    def client(url: str, holder: str, group: str = "lockd") -> FleetLockClient:
        return FleetLockClient(url, group, holder, backoff=0.0)

    assert client(a, "m1").pre_reboot().ok
    assert client(b, "m2").pre_reboot().ok
    full = client(a, "m3").pre_reboot()
    assert (full.ok, full.status, full.kind) == (False, 409, "failed_lock_semaphore_full")
    assert "2 of 2 slots held" in full.message
    assert client(b, "m1").pre_reboot().ok  # already held through the other replica: granted
    client(b, "m1").steady_state()
    client(a, "m1").steady_state()  # recursive: releasing again is fine
    assert client(b, "m3").pre_reboot().ok
    sem = SemaphoreClient(EtcdStore([etcd.url]), "lockd")
    assert sem.show() == (Semaphore(2, ("m2", "m3")), True)

    # Twenty machines through both replicas at once: never more than two inside.
    group = "lockd-contend"
    watcher_sem = SemaphoreClient(EtcdStore([etcd.url]), group)
    with Watcher(lambda: watcher_sem.show()[0]) as watcher:
        reboots, most = contend(
            20,
            2,
            lambda n: client(a if int(n[-2:]) % 2 else b, n, group).pre_reboot().ok,
            lambda n: client(b if int(n[-2:]) % 2 else a, n, group).steady_state(),
        )
    assert set(reboots.values()) == {1} and most == 2
    assert not watcher.violations and watcher.max_held <= 2


def test_lockd_refuses_malformed_requests(replicas: tuple[str, str]) -> None:
    a, _ = replicas
    header = {"fleet-lock-protocol": "true"}
    body = {"client_params": {"id": "m", "group": "default"}}
    cases = [
        ("v1/pre-reboot", {}, body, 400, "missing_header"),
        ("v1/pre-reboot", header, {"client_params": {"id": "", "group": "g"}}, 400, "bad_id"),
        ("v1/pre-reboot", header, {"client_params": {"id": "m", "group": "a/b"}}, 400, "bad_group"),
        ("v1/pre-reboot", header, {"x": 1}, 400, "bad_body"),
        ("v1/unlock", header, body, 404, "not_found"),
    ]
    for path, headers, doc, status, kind in cases:
        response = requests.post(a + path, json=doc, headers=headers, timeout=5)
        assert (response.status_code, response.json()["kind"]) == (status, kind), path
    # The first airlock releases named the id "node_uuid".
    legacy = {"client_params": {"node_uuid": "old", "group": "legacy"}}
    assert requests.post(a + "v1/pre-reboot", json=legacy, headers=header).status_code == 200


def test_lockd_without_etcd_answers_502_and_the_client_retries() -> None:
    store = EtcdStore([f"http://127.0.0.1:{free_port()}"], timeout=(0.3, 0.3))
    server = LockServer(("127.0.0.1", 0), store, 1).start()
    slept: list[float] = []
    try:
        client = FleetLockClient(server.url, "default", "m", backoff=0.5, sleep=slept.append)
        answer = client.pre_reboot()
        assert (answer.ok, answer.status, answer.kind) == (False, 502, "failed_etcd")
        assert slept == [0.5, 1.0]  # three attempts, doubling
        with pytest.raises(LockError, match="refused to release m: HTTP 502"):
            client.steady_state()
    finally:
        server.stop()
    # Nobody listening at all: a LockError after the retries.
    gone = FleetLockClient(server.url, "default", "m", backoff=0.0)
    with pytest.raises(LockError, match="unreachable after 3 attempts"):
        gone.pre_reboot()


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (b'{"total_slots": ' + b"9" * 5000 + b', "holders": []}', "Exceeds the limit"),
        (b'{"total_slots": 1, "holders": ["\xff"]}', "can't decode"),
    ],
)
def test_a_semaphore_value_no_parser_takes_is_a_lock_error(value: bytes, reason: str) -> None:
    with pytest.raises(LockError, match=f"^key: the semaphore is not valid JSON: .*{reason}"):
        Semaphore.parse(value, "key")
