"""Run the real ``parley-relay serve`` as a child process the way systemd would, for tests and benchmarks.

* :class:`NotifySocket` plays systemd's side of ``sd_notify``: an ``AF_UNIX`` datagram socket (abstract
  namespace) whose address goes into ``NOTIFY_SOCKET``; it records every datagram with the sender's pid
  (``SO_PASSCRED``), which is what ``NotifyAccess=main`` checks.
* :func:`listening_socket` + :class:`RelayProcess` with ``activation=`` play socket activation: the
  harness binds and holds the socket, the child gets it as descriptor 3 with ``LISTEN_FDS``/``LISTEN_PID``
  (set by ``python -m relay.testing.process`` in the child itself, after which it execs the relay).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from relay.runtime.forking import TITLE_PREFIX

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


@dataclass(frozen=True)
class Datagram:
    """One notify message: its ``KEY=VALUE`` lines, the sender's pid and when it arrived (monotonic)."""

    fields: Mapping[str, str]
    pid: int
    at: float

    def __contains__(self, line: str) -> bool:
        key, _, value = line.partition("=")
        return self.fields.get(key) == value if value else key in self.fields


class NotifySocket:
    """The receiving end of ``$NOTIFY_SOCKET``; use as a context manager."""

    def __init__(self) -> None:
        self.name = f"parley-relay-test-{uuid.uuid4().hex[:12]}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self.name)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.settimeout(0.1)
        self._lock = threading.Condition()
        self._messages: list[Datagram] = []
        self._closed = False
        self._thread = threading.Thread(target=self._receive, name="notify-socket", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """The ``NOTIFY_SOCKET`` value (``@`` = abstract namespace, as systemd writes it)."""
        return "@" + self.name

    def _receive(self) -> None:
        while not self._closed:
            try:
                data, ancdata, _flags, _addr = self._sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = 0
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(payload[: _UCRED.size])[0]
            fields = dict(line.partition("=")[::2] for line in data.decode().splitlines() if line)
            with self._lock:
                self._messages.append(Datagram(fields, pid, time.monotonic()))
                self._lock.notify_all()

    @property
    def messages(self) -> list[Datagram]:
        with self._lock:
            return list(self._messages)

    def wait_for(self, line: str, timeout: float = 10.0, start: int = 0) -> Datagram:
        """The first datagram from index ``start`` on that has ``line`` (``KEY=VALUE`` or ``KEY``)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for message in self._messages[start:]:
                    if line in message:
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [dict(m.fields) for m in self._messages[start:]]
                    raise TimeoutError(f"no {line!r} datagram within {timeout}s; got {seen}")
                self._lock.wait(left)

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self._sock.close()

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def listening_socket(host: str = "127.0.0.1", port: int = 0, backlog: int = 1024) -> socket.socket:
    """A bound, listening TCP socket as a ``.socket`` unit makes it (the harness keeps it open)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for a process that binds it itself)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def relay_command() -> list[str]:
    """The installed ``parley-relay`` entry point next to this interpreter (else ``python -m relay.cli``)."""
    script = Path(sys.executable).parent / "parley-relay"
    if script.exists():
        return [str(script)]
    found = shutil.which("parley-relay")
    return [found] if found else [sys.executable, "-m", "relay.cli"]


PROCESSES_ENV = "PARLEY_RELAY_TEST_PROCESSES"  # "1": every launched relay runs as one process (serve --processes 1)


def processes_mode() -> str | None:
    """The ``serve --processes`` value the test run asks for (None: the config's, i.e. the multi-process default)."""
    return os.environ.get(PROCESSES_ENV) or None


class RelayProcess:
    """``parley-relay serve`` (or another command) as a child, with its stderr kept in a file.

    The one launcher of real relays for tests and benchmarks. ``processes`` is passed to ``serve
    --processes`` (default: ``$PARLEY_RELAY_TEST_PROCESSES``, so a whole test run can use either mode).
    """

    def __init__(self, config: Path, *, notify: NotifySocket | None = None,
                 activation: Sequence[tuple[str, socket.socket]] = (), env: Mapping[str, str] | None = None,
                 command: Sequence[str] | None = None, log: Path | None = None, processes: str | None = None,
                 new_session: bool = False) -> None:
        self.config = config
        self.log_path = log or config.with_name(f"relay-{uuid.uuid4().hex[:6]}.log")
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
        environ.pop("JOURNAL_STREAM", None)
        if notify is not None:
            environ["NOTIFY_SOCKET"] = notify.address
        environ.update(env or {})
        processes = processes or processes_mode()
        args = list(command) if command is not None else [*relay_command(), "serve", "--config", str(config),
                                                          *(["--processes", processes] if processes else [])]
        fds = [s.fileno() for _, s in activation]
        if activation:
            names = ":".join(name for name, _ in activation)
            args = [sys.executable, "-m", "relay.testing.process", names, *map(str, fds), "--", *args]
        self._log = self.log_path.open("ab")  # a restart on the same log appends
        # new_session: the relay and its role processes form one process group, killed together by kill_all()
        # (a crashed machine or instance, as opposed to a killed main process whose children drain).
        self.proc = subprocess.Popen(args, env=environ, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, pass_fds=fds, start_new_session=new_session)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """Everything the relay wrote so far."""
        return self.log_path.read_text(errors="replace")  # the child writes to the file directly

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    send_signal = signal  # subprocess.Popen's names, for callers written against it

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        self.proc.kill()

    def kill_all(self) -> None:
        """SIGKILL the relay and every process it started (needs ``new_session=True``), then reap it."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def children(self) -> dict[str, int]:
        """The role processes of a multi-process relay by name (``ingest.0``, ``delivery.0``...): pid."""
        return role_processes(self.pid)

    def wait_ready(self, url: str, timeout: float = 30.0) -> None:
        """Poll ``url`` (a ``/readyz``) until it answers 200; an error with the log if the relay exits first."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited with {self.proc.returncode}: {self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"relay not ready within {timeout}s: {self.log()[-3000:]}")
            time.sleep(0.05)

    def wait(self, timeout: float = 30.0) -> int:
        """Exit code (after ``timeout``: killed, and an error)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._log.close()

    def stop(self, timeout: float = 30.0) -> int:
        """``SIGTERM`` and wait, as ``systemctl stop`` does."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def __enter__(self) -> RelayProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def role_processes(pid: int) -> dict[str, int]:
    """Children of ``pid`` titled ``parley-relay: NAME`` (forked role processes), as ``{NAME: child pid}``
    (read from ``/proc``)."""
    found: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            name = argv[0].decode(errors="replace")
            if name.startswith(TITLE_PREFIX):
                found[name.removeprefix(TITLE_PREFIX).strip()] = child
    return found


def _activate(argv: Sequence[str]) -> None:
    """``python -m relay.testing.process NAMES FD... -- COMMAND...``: what systemd does before exec.

    The passed descriptors are moved to 3, 4, ...; ``LISTEN_PID`` is this process's pid, which the exec'd
    relay keeps.
    """
    split = list(argv).index("--")
    names, fds, command = argv[0], [int(fd) for fd in argv[1:split]], list(argv[split + 1 :])
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]  # out of the way: a source may be 3, 4, ...
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(moved):
        os.dup2(fd, 3 + i, inheritable=True)
        os.close(fd)
    os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=names)
    os.execvp(command[0], command)


if __name__ == "__main__":
    _activate(sys.argv[1:])
