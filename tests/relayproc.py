"""Runs ``relay serve`` as a real process for end-to-end tests, and stops it by PID."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path


class RelayProcess:
    def __init__(
        self,
        policy: Path,
        port: int,
        log: Path,
        max_file_size: int | None = None,
        open_files: tuple[int, int] | None = None,
        tls: ssl.SSLContext | None = None,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        prelude: str = "",
    ) -> None:
        self.python, self.env = python, env  # another interpreter, as another user reads it
        self.prelude = prelude  # Python run in the relay's process before it starts
        self.tls = tls  # the listener's mode is implicit: it greets after this handshake
        self.max_file_size = max_file_size  # RLIMIT_FSIZE: writes past it fail with EFBIG
        self.open_files = open_files  # RLIMIT_NOFILE (soft, hard) it starts with
        self.policy = policy
        self.port = port
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RelayProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [self.python, *self._start(), "serve", "-c", str(self.policy)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=self._limits if self.max_file_size or self.open_files else None,
                start_new_session=True,  # its own process group: see crash()
            )
        try:
            self._wait_listening()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):  # nothing of it left
                self.crash()  # a relay that never served is stopped all the same, workers too
            raise
        return self

    def _start(self) -> list[str]:
        if not self.prelude:
            return ["-m", "relay"]
        return ["-c", f"{self.prelude}\nimport sys\nfrom relay.cli import main\nsys.exit(main())"]

    def _limits(self) -> None:
        if self.max_file_size:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            limit = self.max_file_size
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        if self.open_files:
            resource.setrlimit(resource.RLIMIT_NOFILE, self.open_files)

    def _wait_listening(self, timeout: float = 15.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"relay exited {self.proc.returncode}:\n{self.log()}")
            try:
                self._greeted()
                if " serving" in self.log():  # every worker process, not just the first
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"relay did not listen on {self.port}:\n{self.log()}")

    def _greeted(self) -> None:
        """One connection greeted, and QUIT sent: raises OSError until it is."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as plain:
            if self.tls is None:
                plain.recv(512)
                plain.sendall(b"QUIT\r\n")
                return
            with self.tls.wrap_socket(plain, server_hostname="127.0.0.1") as wrapped:
                wrapped.recv(512)
                wrapped.sendall(b"QUIT\r\n")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def crash(self) -> None:
        """kill -9 the supervisor and every worker at once, as a crash of the
        service would (killing only the supervisor makes the workers stop cleanly)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return terminate(self.proc, timeout)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_reloaded(self, times: int) -> None:
        wait_for(lambda: reloaded_everywhere(self.log(), times))


def reloaded_everywhere(log: str, times: int) -> bool:
    """Whether the policy was reloaded ``times`` times and every worker took each
    up: each worker logs its own line, and the supervisor its reload once they have;
    each reload says as it begins, in one process too."""
    found = re.search(r"(\d+) workers? serving", log)
    workers = int(found.group(1)) if found else 0
    begun = log.count("INFO reloading: reading ") >= times
    taken = log.count(": policy ") >= workers * times
    return begun and log.count("policy reloaded") == times and taken


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM and wait; SIGKILL if it is still there after ``timeout``. Its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll until ``condition`` holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


@contextlib.contextmanager
def in_data(port: int) -> Iterator[socket.socket]:
    """A client in the middle of its message: it holds the relay's stop up until
    it ends (the rest of the message and its dot), or closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
        client.recv(512)
        client.sendall(b"EHLO erp\r\nMAIL FROM:<jan@acme.example>\r\n")
        client.sendall(b"RCPT TO:<held@example.org>\r\nDATA\r\n")
        wait_for(lambda: b"354" in client.recv(4096))
        client.sendall(b"From: jan@acme.example\r\nSubject: held\r\n\r\n")
        yield client


def piped_into_head(*args: str) -> tuple[int, str]:
    """``relay ARGS | head -1``: the exit status and standard error of a relay
    command whose reader goes away after the first line (output buffered as
    it is in a pipe)."""
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    command = subprocess.Popen(
        [sys.executable, "-m", "relay", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=buffered,
        cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert command.stdout is not None and command.stderr is not None
    assert command.stdout.readline()  # what head prints, then it exits
    command.stdout.close()
    status = command.wait(60)
    errors = command.stderr.read().decode()
    command.stderr.close()
    return status, errors
