"""Role processes forked from the supervisor (the default process model): a forked child starts as clean as
an exec'd one (environment, descriptors, signal handlers, event loop), the role processes share the pages of
what the supervisor imported and are named in ``ps``, and the supervisor runs no second thread (a fork copies
only the thread that forks)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from relay.runtime.forking import TITLE_PREFIX, fork_role
from relay.testing.process import NotifySocket, free_port
from relay.testing.sandbox import ANDROID_TOKEN, Sandbox, sample
from tests.test_service import _fcm_ids, _start, _wait
from tests.test_supervisor import _hook, _restarted

SHARED_MIB = 10  # a started interpreter shares no written page with its parent; a forked role process 23-28 MiB


def _rollup_mib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) // 1024
    raise AssertionError(f"no {field} in /proc/{pid}/smaps_rollup")


def _sockets(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


def _open_fds() -> set[int]:
    """This process's open descriptors below 1024, found without opening one (as listing /proc would)."""
    found = set()
    for fd in range(1024):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue
        found.add(fd)
    return found


def _listening_inode(port: int) -> int:
    """The inode of the TCP socket listening on 127.0.0.1:``port`` (``/proc/net/tcp``)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
            return int(fields[9])
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


# -- fork_role on its own --------------------------------------------------------------------------


async def test_a_forked_child_starts_with_only_its_environment_descriptors_and_fresh_handlers() -> None:
    """What exec would have reset, the child finds reset: the environment it was given, no descriptor but the
    standard ones and those it was given (stdin on /dev/null), default handlers for the signals the parent's
    loop handled, no wakeup descriptor, no running loop, its title; its return value is its exit status."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: None)
    given, ours = socket.socketpair()
    given_fd = given.fileno()
    hidden = os.open(os.devnull, os.O_RDONLY)  # one more of the parent's, not given to the child
    parents = _open_fds()

    def run() -> int:
        seen = {
            "env": dict(os.environ), "fds": sorted(_open_fds()), "stdin": os.readlink("/proc/self/fd/0"),
            "usr1": signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL,
            "wakeup": signal.set_wakeup_fd(-1), "loop": asyncio._get_running_loop() is None,
            "title": Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode(),
        }
        given.sendall(json.dumps(seen).encode())
        return 7

    try:
        child = fork_role(run, {"ONLY": "this"}, [given.fileno()], "probe.0")
        assert await asyncio.wait_for(child.wait(), 30) == 7
        seen = json.loads(ours.recv(65536))
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
        os.close(hidden)
        given.close()
        ours.close()
    assert hidden in parents and len(parents) > 4  # the parent had more open than the child may keep
    assert seen["env"] == {"ONLY": "this"}
    assert seen["fds"] == [0, 1, 2, given_fd]
    assert seen["stdin"] == os.devnull
    assert seen["usr1"] and seen["wakeup"] == -1 and seen["loop"]
    assert seen["title"] == TITLE_PREFIX + "probe.0"


async def test_a_forked_childs_metrics_are_written_under_its_own_pid_without_asking_the_kernel_each_time(
        tmp_path: Path) -> None:
    """prometheus_client names each process's metric files by pid and checks the pid on every change; the
    child's value class answers from the pid remembered at fork (no system call per metric change), and a
    process forked from the child again writes under its own pid, not its parent's."""
    given, ours = socket.socketpair()

    def run() -> int:
        from prometheus_client import CollectorRegistry, Counter

        counter = Counter("probe", "probe", registry=CollectorRegistry())
        calls = 0

        def profile(frame: object, what: str, arg: object) -> None:
            nonlocal calls
            if what == "c_call" and arg is os.getpid:
                calls += 1

        sys.setprofile(profile)
        try:
            for _ in range(100):
                counter.inc()
        finally:
            sys.setprofile(None)
        grandchild = os.fork()
        if grandchild == 0:
            counter.inc()
            os._exit(0)
        os.waitpid(grandchild, 0)
        given.sendall(json.dumps({"pid": os.getpid(), "grandchild": grandchild, "getpid_calls": calls}).encode())
        return 0

    try:
        child = fork_role(run, {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}, [given.fileno()], "probe.0")
        assert await asyncio.wait_for(child.wait(), 30) == 0
        seen = json.loads(ours.recv(65536))
    finally:
        given.close()
        ours.close()
    assert seen["getpid_calls"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"counter_{seen['pid']}.db", f"counter_{seen['grandchild']}.db"])


async def test_a_signal_sent_to_a_forked_child_reaches_the_child_not_the_parents_loop() -> None:
    """The parent's loop handles SIGUSR1; the child, which keeps a copy of the parent's wakeup pipe, dies of
    SIGUSR1 (default action) and the parent's handler never runs."""
    loop = asyncio.get_running_loop()
    parent_saw: list[int] = []
    loop.add_signal_handler(signal.SIGUSR1, parent_saw.append, signal.SIGUSR1)

    def run() -> int:
        time.sleep(30)
        return 0

    try:
        child = fork_role(run, {}, [], "probe.1")
        await asyncio.sleep(0.5)
        child.send_signal(signal.SIGUSR1)
        assert await asyncio.wait_for(child.wait(), 10) == -signal.SIGUSR1
        await asyncio.sleep(0.2)
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
    assert parent_saw == []
    child.send_signal(signal.SIGKILL)  # ended and reaped: no process is signalled


# -- the supervisor's role processes ---------------------------------------------------------------


def test_role_processes_are_forked_from_the_supervisor_share_its_pages_and_are_named_in_ps(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """Each role process is the supervisor's child, titled ``parley-relay: NAME``, and shares at least
    SHARED_MIB of the supervisor's written pages (the modules it imported once for all of them)."""
    relay = _start(sandbox, notify, webhook_socket, mode="auto")
    with relay:
        children = relay.children()
        assert sorted(children) == ["delivery.0", "ingest.0"]
        for name, pid in children.items():
            assert _ppid(pid) == relay.pid
            assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode() == TITLE_PREFIX + name
            shared = _rollup_mib(pid, "Shared_Dirty")
            assert shared >= SHARED_MIB, f"{name} shares {shared} MiB of written pages with the supervisor"
        relay.stop()


def test_a_role_process_holds_the_listening_socket_and_no_other_socket_of_the_supervisor(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """The webhook process shares the listening sockets (webhooks, /metrics) and nothing else of the
    supervisor's (its notify sockets); the delivery process shares none, and neither does one started again."""
    ops = free_port()
    relay = _start(sandbox, notify, webhook_socket, mode="auto", metrics={"listen": {"host": "127.0.0.1", "port": ops}})
    with relay:
        listening = {f"socket:[{os.fstat(webhook_socket.fileno()).st_ino}]", f"socket:[{_listening_inode(ops)}]"}
        supervisor = _sockets(relay.pid)
        assert listening <= supervisor and len(supervisor) > len(listening)
        children = relay.children()
        assert _sockets(children["ingest.0"]) & supervisor == listening
        assert _sockets(children["delivery.0"]) & supervisor == set()
        os.kill(children["delivery.0"], signal.SIGKILL)
        again = _restarted(relay, "delivery.0", children["delivery.0"])  # found by its title: set after the sweep
        assert _sockets(again) & _sockets(relay.pid) == set()
        relay.stop()


def test_the_supervisor_runs_one_thread_when_ready_and_after_restarting_a_child_that_then_delivers(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """The supervisor runs no other thread (the store is prepared in its own), ready or after it started a
    killed delivery process again; the new process delivers."""
    relay = _start(sandbox, notify, webhook_socket, mode="auto")
    with relay:
        assert os.listdir(f"/proc/{relay.pid}/task") == [str(relay.pid)]
        old = relay.children()["delivery.0"]
        os.kill(old, signal.SIGKILL)
        _restarted(relay, "delivery.0", old)
        assert _hook(webhook_socket, sample("message", to=[ANDROID_TOKEN], id=1801)) == 200
        _wait(lambda: 1801 in _fcm_ids(sandbox), timeout=30, what="the push through the restarted process")
        assert os.listdir(f"/proc/{relay.pid}/task") == [str(relay.pid)]
        relay.stop()
