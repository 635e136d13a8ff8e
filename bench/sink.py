"""The upstream: a counting SMTP sink on loopback that records arrival times.

``SmtpSink`` runs Debian's ``smtp-sink`` (package postfix) with ``-d``: each
transaction is dumped to its own file on tmpfs, the file's mtime is the
arrival time (end of DATA) and its X-Bench-Id header names the message.
``PySink`` is the fallback when smtp-sink is not installed: this file run as a
script, a small asyncio SMTP server that appends ``token time nrcpt size`` per
message to a log. Both run as child processes, stopped by PID.

Usage of the fallback by hand:  python bench/sink.py PORT LOGFILE
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

END_MARK = b"bench-end "
ID_HEADER = b"X-Bench-Id: "


@dataclass(frozen=True)
class Arrival:
    at: float  # wall clock
    recipients: int
    size: int


def wait_listening(port: int, proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as s:
            s.settimeout(2)
            s.recv(512)
            s.sendall(b"QUIT\r\n")
            with contextlib.suppress(OSError):
                s.recv(512)
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout:g}s")


def stop_pid(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class BaseSink:
    kind = "?"
    proc: subprocess.Popen | None = None

    def __init__(self) -> None:
        self.seen: dict[str, Arrival] = {}  # token -> first arrival
        self.counts: dict[str, int] = {}  # token -> transactions (smtp-source sends one token)
        self.latest: dict[str, float] = {}  # token -> last arrival
        self.multi: dict[str, int] = {}  # token -> transactions with 2+ recipients (the BCC)

    def _record(self, token: str, arrival: Arrival) -> None:
        if token not in self.seen or arrival.at < self.seen[token].at:
            self.seen[token] = arrival
        self.counts[token] = self.counts.get(token, 0) + 1
        self.latest[token] = max(self.latest.get(token, 0.0), arrival.at)
        if arrival.recipients >= 2:
            self.multi[token] = self.multi.get(token, 0) + 1

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def poll(self) -> None:
        raise NotImplementedError

    def cpu_seconds(self) -> float:
        """CPU time of the sink's processes (smtp-sink and its watcher, or the asyncio sink)."""
        from bench import procstat

        procs = [self.proc, getattr(self, "watcher", None)]
        return sum(procstat.cpu_seconds(p.pid, True) for p in procs if p is not None)

    def arrivals(self, tag: str) -> dict[str, Arrival]:
        self.poll()
        prefix = tag + "-"
        return {t: a for t, a in self.seen.items() if t.startswith(prefix)}

    def wait_for(self, tag: str, count: int, timeout: float) -> dict[str, Arrival]:
        """Poll until ``count`` distinct messages of run ``tag`` arrived, or ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.arrivals(tag)
            if len(got) >= count or time.monotonic() >= deadline:
                return got
            time.sleep(0.1)

    def wait_count(self, token: str, count: int, timeout: float) -> int:
        """Poll until ``count`` transactions carrying ``token`` arrived, or ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if self.counts.get(token, 0) >= count or time.monotonic() >= deadline:
                return self.counts.get(token, 0)
            time.sleep(0.1)

    def forget(self, tag: str) -> None:
        prefix = tag + "-"
        for table in (self.seen, self.counts, self.latest, self.multi):
            for token in [t for t in table if t.startswith(prefix)]:
                del table[token]

    def stop(self) -> None:
        stop_pid(self.proc)


class SmtpSink(BaseSink):
    """Debian's smtp-sink, dumping each transaction to its own file on tmpfs.

    File mtimes come from the kernel's coarse clock (a few ms off), so a
    watcher process (this file, ``watch`` mode) stamps each file with
    ``time.time()`` when inotify reports it closed, i.e. at the end of DATA.
    Without inotify the mtime is used (``self.precise`` is then False).
    """

    kind = "smtp-sink"

    def __init__(self, port: int, directory: Path) -> None:
        super().__init__()
        self.port = port
        self.dir = directory / "dumps"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        self.stamps_path = directory / "closed.log"
        self.stamps_path.touch()
        self.stamps: dict[str, float] = {}
        self.offset = 0
        self.watcher: subprocess.Popen | None = None
        self.precise = False
        command = [shutil.which("smtp-sink") or "smtp-sink", "-4", "-m", "2000"]
        if os.geteuid() == 0:  # smtp-sink insists on dropping root
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
            command += ["-u", "nobody"]
        command += ["-d", f"{self.dir}/m.", f"127.0.0.1:{port}", "1024"]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        try:
            self._start_watcher()
            wait_listening(port, self.proc)
            self.probe()
        except RuntimeError as exc:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() else ""
            self.stop()
            raise RuntimeError(f"smtp-sink: {exc} {err}".strip()) from exc

    def _start_watcher(self) -> None:
        ready = self.stamps_path.with_suffix(".ready")
        self.watcher = subprocess.Popen(
            [sys.executable, __file__, "watch", str(self.dir), str(self.stamps_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.watcher.poll() is None:
            if ready.exists():
                self.precise = True
                return
            time.sleep(0.02)
        stop_pid(self.watcher)
        self.watcher = None  # no inotify: mtimes it is

    def probe(self) -> None:
        """One message through the sink, to be sure its dump files can be read back."""
        import smtplib

        data = f"Subject: probe\r\n{ID_HEADER.decode()}probe-0\r\n\r\nx\r\n"
        data += END_MARK.decode() + "probe-0\r\n"
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
                client.sendmail("probe@bench.example", ["probe@bench.example"], data)
        except (OSError, smtplib.SMTPException) as exc:
            raise RuntimeError(f"probe message not accepted: {exc}") from exc
        if not self.wait_for("probe", 1, 5.0):
            raise RuntimeError(f"probe message not found in {self.dir} (permissions?)")
        self.forget("probe")

    @staticmethod
    def available() -> bool:
        return shutil.which("smtp-sink") is not None

    def _read_stamps(self) -> None:
        with self.stamps_path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        for line in chunk[:end].splitlines():
            name, at = line.split()
            self.stamps[name.decode()] = float(at)

    def poll(self) -> None:
        """Record every complete dump file, then delete it."""
        if self.precise:
            self._read_stamps()
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for name in names:
            if self.precise and name not in self.stamps:
                continue  # not closed yet
            path = self.dir / name
            try:
                with path.open("rb") as f:
                    st = os.fstat(f.fileno())
                    head = f.read(16384)
                    tail = head[-512:]
                    if st.st_size > len(head):
                        f.seek(max(st.st_size - 512, 0))
                        tail = f.read()
            except OSError:
                continue
            if END_MARK not in tail and not self.precise:
                continue  # still being written
            start = head.find(ID_HEADER)
            if start < 0:
                with contextlib.suppress(OSError):
                    path.unlink()  # not one of ours (e.g. a connection probe)
                continue
            token = head[start + len(ID_HEADER) : head.find(b"\n", start)].strip().decode()
            rcpts = head.count(b"\nX-Rcpt-Args:")
            at = self.stamps.pop(name, None) or st.st_mtime_ns / 1e9
            self._record(token, Arrival(at, rcpts, st.st_size))
            with contextlib.suppress(OSError):
                path.unlink()

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            stop_pid(self.watcher)


class PySink(BaseSink):
    """The asyncio fallback (this file as a script) in its own process."""

    kind = "python asyncio sink"

    def __init__(self, port: int, directory: Path) -> None:
        super().__init__()
        self.port = port
        directory.mkdir(parents=True, exist_ok=True)
        self.log = directory / "arrivals.log"
        self.log.touch()
        self.offset = 0
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(port), str(self.log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_listening(port, self.proc)
        except RuntimeError:
            self.stop()
            raise

    def poll(self) -> None:
        with self.log.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        for line in chunk[:end].splitlines():
            token, at, rcpts, size = line.decode().split()
            self._record(token, Arrival(float(at), int(rcpts), int(size)))


def make_sink(port: int, directory: Path, prefer: str = "auto") -> BaseSink:
    if prefer in ("auto", "smtp-sink") and SmtpSink.available():
        return SmtpSink(port, directory)
    if prefer == "smtp-sink":
        raise RuntimeError("smtp-sink is not installed (apt-get install postfix)")
    return PySink(port, directory)


# --- the fallback server itself ------------------------------------------------


async def _session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log) -> None:
    def say(text: str) -> None:
        writer.write(text.encode() + b"\r\n")

    say("220 bench-sink ESMTP")
    rcpts = 0
    try:
        while True:
            line = await asyncio.wait_for(reader.readline(), 300)
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                say("250-bench-sink\r\n250-8BITMIME\r\n250 SIZE 104857600")
            elif verb == b"MAIL":
                rcpts = 0
                say("250 2.1.0 Ok")
            elif verb == b"RCPT":
                rcpts += 1
                say("250 2.1.5 Ok")
            elif verb == b"DATA":
                say("354 End data with <CR><LF>.<CR><LF>")
                await writer.drain()
                data = await asyncio.wait_for(reader.readuntil(b"\r\n.\r\n"), 300)
                at = time.time()
                start = data.find(ID_HEADER)
                token = "-"
                if start >= 0:
                    token = data[start + len(ID_HEADER) : data.find(b"\r\n", start)].decode()
                log.write(f"{token} {at:.6f} {rcpts} {len(data)}\n".encode())
                log.flush()
                say("250 2.0.0 Ok: queued")
            elif verb == b"QUIT":
                say("221 2.0.0 Bye")
                await writer.drain()
                return
            elif verb in (b"RSET", b"NOOP"):
                rcpts = 0 if verb == b"RSET" else rcpts
                say("250 2.0.0 Ok")
            else:
                say("502 5.5.2 Error: command not recognized")
            await writer.drain()
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def _serve(port: int, log_path: str) -> None:
    log = open(log_path, "ab", buffering=0)  # noqa: SIM115 - lives as long as the server
    server = await asyncio.start_server(
        lambda r, w: _session(r, w, log), "127.0.0.1", port, limit=2**27, backlog=1024
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def _watch(directory: str, log_path: str) -> None:
    """Append ``NAME TIME`` for every file closed after writing in ``directory``."""
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(0)
    if fd < 0 or libc.inotify_add_watch(fd, directory.encode(), 0x8) < 0:  # IN_CLOSE_WRITE
        sys.exit(1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    Path(log_path).with_suffix(".ready").touch()
    with open(log_path, "ab", buffering=0) as log:
        while True:
            buf = os.read(fd, 1 << 16)
            at = f" {time.time():.6f}\n".encode()
            out, i = [], 0
            while i + 16 <= len(buf):
                _wd, _mask, _cookie, size = struct.unpack_from("iIII", buf, i)
                name = buf[i + 16 : i + 16 + size].rstrip(b"\0")
                i += 16 + size
                if name:
                    out.append(name + at)
            log.write(b"".join(out))


if __name__ == "__main__":
    if sys.argv[1] == "watch":
        _watch(sys.argv[2], sys.argv[3])
        sys.exit(0)
    try:
        import uvloop

        uvloop.run(_serve(int(sys.argv[1]), sys.argv[2]))
    except ImportError:
        asyncio.run(_serve(int(sys.argv[1]), sys.argv[2]))
