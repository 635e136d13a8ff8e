#!/usr/bin/env python3
"""Benchmark the relay (and optionally a Postfix + OpenDKIM set-up doing the same job).

    .venv/bin/python bench/run.py --quick                 # smoke run, under a minute
    .venv/bin/python bench/run.py                         # scenarios a, b, c, 3 repeats
    .venv/bin/python bench/run.py --compare-postfix       # the same against Postfix+OpenDKIM
    .venv/bin/python bench/run.py --big 25 --idle 1000    # memory: one 25 MB message, idle clients
    .venv/bin/python bench/run.py --profile DIR           # + one py-spy profile of scenario a
    .venv/bin/python bench/run.py --driver smtp-source --reconnect   # load from smtp-source

Each run gets a fresh ``relay serve`` (fresh spool and audit log) on a throw-away
policy, warm-up messages, then the measured load; messages are counted where
they arrive, at a sink on loopback. Every process started here is stopped by
PID at the end, also on Ctrl-C. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import calibrate, load, procstat  # noqa: E402
from bench.load import Users  # noqa: E402
from bench.postfix import PostfixInstance, PostfixUnavailable  # noqa: E402
from bench.relayside import (  # noqa: E402
    RelayServer,
    check_policy,
    make_key,
    write_policy,
    write_suppressions,
)
from bench.sink import BaseSink, make_sink, stop_pid  # noqa: E402

KB, MB = 1024, 1024 * 1024
BIG_TARGET_MB, IDLE_TARGET_MB = 120, 150


@dataclass(frozen=True)
class Scenario:
    name: str
    size: int
    sessions: int
    messages: int
    paced: bool = False  # at half the rate the same side reached in (a) of this run
    rate: float | None = None  # messages/s, the same for both sides

    @property
    def title(self) -> str:
        size = f"{self.size // KB} KB" if self.size >= KB else f"{self.size} B"
        plural = "s" if self.sessions != 1 else ""
        pace = ", paced at half of (a)'s rate" if self.paced else ""
        pace = f", paced at {self.rate:g} msg/s" if self.rate else pace
        return f"({self.name}) {size} x {self.messages}, {self.sessions} session{plural}{pace}"


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of a list; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_mb": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg()[0],
    }


def relay_version() -> dict[str, Any]:
    """The commit measured, and which files of relay/ differ from it (others edit them)."""

    def git(*args: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
            )
            return done.stdout.rstrip() if done.returncode == 0 else ""
        return ""

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "changed": [
            line.split(maxsplit=1)[-1]
            for line in git("status", "--porcelain", "--", "relay").splitlines()
        ],
    }


def smtp_source_available() -> bool:
    return shutil.which("smtp-source") is not None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="relay-bench-", dir=args.workdir))
        self.work.chmod(0o755)  # the postfix and opendkim users must reach their directories
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) else self.work
        self.fast = Path(tempfile.mkdtemp(prefix="relay-bench-sink-", dir=base))
        self.fast.chmod(0o755)
        self.users = Users.make(args.users)
        self.key = make_key(self.work / "keys")
        self.login = ("bench-erp", "bench-password") if args.auth else None
        self.cleanup: list[Any] = []  # things with .stop(), stopped in reverse order
        self.relay_sink: BaseSink | None = None
        self.postfix_sink: BaseSink | None = None
        self.postfix: PostfixInstance | None = None
        self.postfix_error: str | None = None
        self.postfix_port = 0
        self.serial = 0

    # --- processes ---------------------------------------------------------------

    def start_sinks(self) -> None:
        self.relay_sink = make_sink(free_port(), self.fast / "sink-relay", self.args.sink)
        self.cleanup.append(self.relay_sink)
        say(
            f"sink for the relay: {self.relay_sink.kind} on 127.0.0.1:{self.relay_sink.port}"
            f" (pid {self.relay_sink.pid})"
        )

    def start_postfix(self) -> None:
        try:
            self.postfix_sink = make_sink(free_port(), self.fast / "sink-postfix", self.args.sink)
            self.cleanup.append(self.postfix_sink)
            self.postfix_port = free_port()
            instance = PostfixInstance(
                self.work / "postfix",
                self.postfix_port,
                self.postfix_sink.port,
                self.key,
                self.users,
                max_size=self.max_size(),
            )
            self.cleanup.append(instance)
            instance.configure()
            instance.start()
            self.postfix = instance
            say(
                f"postfix: master pid {instance.master_pid}, opendkim pid"
                f" {instance.opendkim.pid if instance.opendkim else '?'},"
                f" smtpd 127.0.0.1:{self.postfix_port}"
            )
        except (PostfixUnavailable, RuntimeError, OSError, subprocess.SubprocessError) as exc:
            self.postfix_error = str(exc)
            say(f"POSTFIX COMPARISON NOT RUN: {exc}")

    def max_size(self) -> int:
        big = int(self.args.big * MB * 1.1) + MB if self.args.big else 0
        return max(26214400, big)

    def start_relay(self, label: str) -> RelayServer:
        self.serial += 1
        port = free_port()
        state = self.work / f"relay-{self.serial:02d}-{label}"
        state.mkdir()
        assert self.relay_sink is not None
        policy = write_policy(
            state / "relay.yaml",
            port,
            self.relay_sink.port,
            self.key,
            state / "state",
            self.users,
            max_message_size=self.max_size(),
            workers=self.args.workers,
            login=self.login,
        )
        write_suppressions(state / "state", self.args.suppressed)
        if self.serial == 1:
            check_policy(policy)
        relay = RelayServer(policy, port, state / "relay.log")
        self.cleanup.append(relay)
        relay.start()
        return relay

    def stop_all(self) -> None:
        while self.cleanup:
            thing = self.cleanup.pop()
            try:
                thing.stop()
            except Exception as exc:  # keep stopping the others
                say(f"warning: stopping {thing!r}: {exc}")

    def remove_files(self) -> None:
        if self.args.keep:
            say(f"kept: {self.work} {self.fast}")
            return
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.fast, ignore_errors=True)

    # --- one measured run ----------------------------------------------------------

    def warm_up(self, port: int, sink: BaseSink, sc: Scenario, tag: str) -> None:
        count = max(20, 2 * sc.sessions)
        work = load.jobs(tag, count, min(sc.size, 102400), self.users, seed=7)
        load.run(
            load.drive(
                "127.0.0.1", port, work, sc.sessions, self.args.reconnect, 60, login=self.login
            )
        )
        sink.wait_for(tag, count, 60)
        sink.forget(tag)

    def measure(
        self,
        port: int,
        sink: BaseSink,
        sc: Scenario,
        tag: str,
        cpu,
        seed: int,
        rate: float | None = None,
    ) -> dict[str, Any]:
        if self.args.driver == "smtp-source":
            return self.measure_smtp_source(port, sink, sc, tag, cpu)
        work = load.jobs(tag, sc.messages, sc.size, self.users, seed=seed)
        own0 = os.times()
        stolen0 = procstat.stolen_seconds()
        cpu0, sink0, t0 = cpu(), sink.cpu_seconds(), time.time()
        results = load.run(
            load.drive(
                "127.0.0.1",
                port,
                work,
                sc.sessions,
                self.args.reconnect,
                120,
                rate,
                login=self.login,
            )
        )
        t_sent = time.time()
        own1 = os.times()
        ok = [r for r in results if r.code == 250]
        wait = max(60.0, 3 * (t_sent - t0))
        arrivals = sink.wait_for(tag, len(ok), wait)
        time.sleep(0.3)  # let the server finish its bookkeeping after the last delivery
        cpu1, sink1 = cpu(), sink.cpu_seconds()
        stolen = stolen_share(stolen0, t0)
        sink.forget(tag)
        failures = [r for r in results if r.code != 250]
        out: dict[str, Any] = {
            "sent": len(results),
            "accepted": len(ok),
            "refused_or_failed": len(failures),
            "failure_sample": failures[0].reply if failures else None,
            "arrived": len(arrivals),
            "with_bcc": sum(1 for a in arrivals.values() if a.recipients >= 2),
        }
        if arrivals:
            last = max(a.at for a in arrivals.values())
            out["msgs_per_s"] = len(arrivals) / (last - t0)
        if ok:
            out["accepted_per_s"] = len(ok) / (max(r.answered for r in ok) - t0)
            lat = [r.latency * 1000 for r in ok]
            out["accept_p50_ms"], out["accept_p99_ms"] = percentile(lat, 50), percentile(lat, 99)
            e2e = [(arrivals[r.token].at - r.sent) * 1000 for r in ok if r.token in arrivals]
            out["e2e_p50_ms"], out["e2e_p99_ms"] = percentile(e2e, 50), percentile(e2e, 99)
            out["cpu_ms_per_msg"] = (cpu1 - cpu0) / len(ok) * 1000
        client = (own1.user + own1.system) - (own0.user + own0.system)
        out["client_cpu_ms_per_msg"] = client / max(len(results), 1) * 1000
        out["sink_cpu_ms_per_msg"] = (sink1 - sink0) / max(len(arrivals), 1) * 1000
        out["stolen_pct"] = stolen
        return out

    def measure_smtp_source(
        self, port: int, sink: BaseSink, sc: Scenario, tag: str, cpu
    ) -> dict[str, Any]:
        """Throughput only: smtp-source sends one pre-formatted invoice N times."""
        token = f"{tag}-src"
        job = load.jobs(tag, 1, sc.size, self.users, seed=3)[0]
        eml = self.work / f"{tag}.eml"
        eml.write_bytes(job.data.replace(b"\r\n", b"\n").replace(b"-000000", b"-src"))
        command = [
            "smtp-source",
            "-s",
            str(sc.sessions),
            "-m",
            str(sc.messages),
            "-F",
            str(eml),
            "-f",
            job.mail_from,
            "-t",
            job.rcpts[0],
            "-M",
            "erp.bench.example",
        ]
        if not self.args.reconnect:
            command.append("-d")
        command.append(f"127.0.0.1:{port}")
        stolen0 = procstat.stolen_seconds()
        cpu0, t0 = cpu(), time.time()
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        t_sent = time.time()
        arrived = sink.wait_count(token, sc.messages, max(60.0, 3 * (t_sent - t0)))
        time.sleep(0.3)
        cpu1 = cpu()
        stolen = stolen_share(stolen0, t0)
        last = sink.latest.get(token, t_sent)
        with_bcc = sink.multi.get(token, 0)
        sink.forget(tag)
        return {
            "sent": sc.messages,
            "accepted": sc.messages if done.returncode == 0 else None,
            "refused_or_failed": 0 if done.returncode == 0 else None,
            "failure_sample": done.stderr.strip()[-300:] if done.returncode else None,
            "arrived": arrived,
            "with_bcc": with_bcc,
            "msgs_per_s": arrived / (last - t0) if arrived else None,
            "accepted_per_s": sc.messages / (t_sent - t0) if done.returncode == 0 else None,
            "cpu_ms_per_msg": (cpu1 - cpu0) / max(arrived, 1) * 1000,
            "stolen_pct": stolen,
        }

    def run_relay(self, sc: Scenario, rep: int, rate: float | None = None) -> dict[str, Any]:
        tag = f"r{sc.name}{rep}"
        relay = self.start_relay(f"{sc.name}{rep}")
        try:
            assert self.relay_sink is not None
            self.warm_up(relay.port, self.relay_sink, sc, tag + "w")
            out = self.measure(
                relay.port,
                self.relay_sink,
                sc,
                tag,
                lambda: procstat.tree_cpu(relay.pid),
                seed=rep + 1,
                rate=rate,
            )
            out["peak_rss_mb"] = (procstat.tree_max_kb(relay.pid, "VmHWM") or 0) / KB
            out["mem_end_mb"] = procstat.tree_pss_kb(relay.pid) / KB
            if out["arrived"] < out["accepted"] or out["refused_or_failed"]:
                out["log_problems"] = problems(relay.log)
                say(
                    f"    relay: {out['accepted'] - out['arrived']} accepted but not arrived;"
                    f" log: {out['log_problems'][:3]}"
                )
            return out
        finally:
            relay.stop()
            self.cleanup.remove(relay)

    def run_postfix(self, sc: Scenario, rep: int, rate: float | None = None) -> dict[str, Any]:
        assert self.postfix is not None and self.postfix_sink is not None
        tag = f"p{sc.name}{rep}"
        self.warm_up(self.postfix_port, self.postfix_sink, sc, tag + "w")
        out = self.measure(
            self.postfix_port,
            self.postfix_sink,
            sc,
            tag,
            self.postfix.cpu_seconds,
            seed=rep + 1,
            rate=rate,
        )
        out["mem_end_mb"] = self.postfix.pss_kb() / KB  # PSS sum over all processes, at the end
        if out["arrived"] < (out["accepted"] or 0) or out["refused_or_failed"]:
            out["log_problems"] = problems(self.postfix.run / "maillog")
            say(
                f"    postfix: {(out['accepted'] or 0) - out['arrived']} accepted but not arrived;"
                f" log: {out['log_problems'][:3]}"
            )
        deadline = time.monotonic() + 30
        while not self.postfix.queue_empty() and time.monotonic() < deadline:
            time.sleep(0.2)
        return out

    # --- memory scenarios ----------------------------------------------------------

    def run_big(self, mb: float) -> dict[str, Any]:
        size = int(mb * MB)
        relay = self.start_relay("big")
        try:
            assert self.relay_sink is not None
            small = Scenario("big", 2048, 1, 1)
            self.warm_up(relay.port, self.relay_sink, small, "bigw")
            before_rss = procstat.tree_pss_kb(relay.pid) / KB
            before_hwm = (procstat.tree_max_kb(relay.pid, "VmHWM") or 0) / KB
            say(f"  big: building a {size / MB:.1f} MB invoice ...")
            work = load.jobs("big", 1, size, self.users, seed=5)
            t0 = time.time()
            results = load.run(load.drive("127.0.0.1", relay.port, work, 1, False, 600))
            at_reply = (procstat.tree_max_kb(relay.pid, "VmHWM") or 0) / KB  # ingress + pipeline
            arrived = self.relay_sink.wait_for("big", 1, 600)
            time.sleep(0.5)
            r = results[0]
            out = {
                "message_bytes": len(work[0].data),
                "reply": r.reply,
                "accept_latency_s": r.latency if r.code == 250 else None,
                "e2e_s": (arrived[r.token].at - r.sent) if r.token in arrived else None,
                "total_s": (arrived[r.token].at - t0) if r.token in arrived else None,
                "delivered": bool(arrived),
                "rss_before_mb": before_rss,
                "peak_rss_before_mb": before_hwm,
                "peak_rss_at_reply_mb": at_reply,
                "peak_rss_mb": (procstat.tree_max_kb(relay.pid, "VmHWM") or 0) / KB,
                "target_mb": BIG_TARGET_MB,
            }
            self.relay_sink.forget("big")
            out["within_target"] = out["peak_rss_mb"] < BIG_TARGET_MB
            return out
        finally:
            relay.stop()
            self.cleanup.remove(relay)

    def run_idle(self, count: int, hold: float) -> dict[str, Any]:
        relay = self.start_relay("idle")
        try:
            assert self.relay_sink is not None
            self.warm_up(relay.port, self.relay_sink, Scenario("idle", 2048, 1, 1), "idlew")
            before = procstat.tree_pss_kb(relay.pid) / KB

            def sample() -> dict[str, float]:
                pids = [relay.pid, *procstat.descendants(relay.pid)]
                fds = sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)
                return {
                    "rss_mb": procstat.tree_pss_kb(relay.pid) / KB,
                    "peak_rss_mb": (procstat.tree_max_kb(relay.pid, "VmHWM") or 0) / KB,
                    "relay_fds": fds,
                }

            cpu0 = procstat.tree_cpu(relay.pid)
            t0 = time.time()
            alive, during = load.run(load.hold_idle("127.0.0.1", relay.port, count, hold, sample))
            cpu1 = procstat.tree_cpu(relay.pid)
            out = {
                "connections_requested": count,
                "connections_open": alive,
                "hold_s": hold,
                "rss_before_mb": before,
                **during,
                "kb_per_connection": (during["rss_mb"] - before) * KB / max(alive, 1),
                "relay_cpu_s": cpu1 - cpu0,
                "wall_s": time.time() - t0,
                "target_mb": IDLE_TARGET_MB,
            }
            out["within_target"] = out["peak_rss_mb"] < IDLE_TARGET_MB and alive == count
            return out
        finally:
            relay.stop()
            self.cleanup.remove(relay)

    # --- profile ---------------------------------------------------------------------

    def run_profile(self, sc: Scenario, out_dir: Path) -> dict[str, Any]:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            return {"error": "py-spy not found (.venv/bin/pip install py-spy)"}
        out_dir.mkdir(parents=True, exist_ok=True)
        raw = out_dir / "relay-profile.txt"
        relay = self.start_relay("profile")
        recorder = None
        try:
            assert self.relay_sink is not None
            self.warm_up(relay.port, self.relay_sink, sc, "profw")
            recorder = subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(relay.pid),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--subprocesses",  # the workers, not the supervisor waiting on them
                    "--gil",  # samples of the thread holding the GIL: where Python CPU goes
                    "--duration",
                    "600",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            self.cleanup.append(_Proc(recorder))
            time.sleep(1.0)  # py-spy attaches
            if recorder.poll() is not None:
                return {"error": f"py-spy: {recorder.stderr.read().decode(errors='replace')}"}
            run = self.measure(
                relay.port,
                self.relay_sink,
                sc,
                "prof",
                lambda: procstat.tree_cpu(relay.pid),
                seed=99,
            )
            recorder.send_signal(signal.SIGINT)
            try:
                recorder.wait(60)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait(5)
        finally:
            if recorder is not None:
                stop_pid(recorder)
            relay.stop()
            self.cleanup.remove(relay)
        if not raw.exists():
            return {"error": "py-spy wrote no profile"}
        return {"file": str(raw), "run": run, **hot_spots(raw)}


def problems(log: Path, limit: int = 10) -> list[str]:
    """Lines of a server log that say why something was not delivered."""
    words = ("deferred", "WARNING", "ERROR", "warning:", "error:", "fatal:", "reject")
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if any(w in line for w in words)][:limit]


class _Proc:
    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def stop(self) -> None:
        stop_pid(self.proc)


# frames every stack goes through (entry points, the event loop, the thread pool)
_ENTRY_FRAMES = (
    "<module> ",
    "_run_code ",
    "_run_module_as_main ",
    "main (relay/cli.py",
    "_serve (relay/cli",
    "run (relay/server.py",
    "run (uvloop",
    "Runner.run ",
    "Thread.",
    "_worker ",
    "_WorkItem.run ",
)


def hot_spots(raw: Path, top: int = 15) -> dict[str, Any]:
    """Self ("leaf") and inclusive shares per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        frames = [
            f for f in frames if f and not f.startswith("process ") and not f.startswith("thread ")
        ]
        if not frames:
            continue
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            if not f.startswith(_ENTRY_FRAMES):
                incl[f] = incl.get(f, 0) + n

    def table(d: dict[str, int]) -> list[dict[str, Any]]:
        rows = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return [{"function": k, "samples": v, "share": v / total} for k, v in rows]

    return {"samples": total, "self": table(own), "inclusive": table(incl)}


def _frame(frame: str) -> str:
    """'send (aiosmtplib/smtp.py:123)' -> 'send (aiosmtplib/smtp.py)': one row per function."""
    frame = frame.strip()
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker.startswith("/lib"):
                path = path.split("/", 1)[-1]
    if str(ROOT) in path:
        path = path.replace(str(ROOT) + "/", "")
    return f"{name} ({path})" if path else name


# --- reporting ----------------------------------------------------------------------

ROWS = [
    ("msgs_per_s", "messages/s at the sink (distinct)", "{:.1f}"),
    ("accepted_per_s", "accepted/s (client side)", "{:.1f}"),
    ("accept_p50_ms", "accept latency p50 (ms)", "{:.1f}"),
    ("accept_p99_ms", "accept latency p99 (ms)", "{:.1f}"),
    ("e2e_p50_ms", "end-to-end latency p50 (ms)", "{:.1f}"),
    ("e2e_p99_ms", "end-to-end latency p99 (ms)", "{:.1f}"),
    ("cpu_ms_per_msg", "CPU per message (ms) [1]", "{:.2f}"),
    ("peak_rss_mb", "relay peak RSS, largest process (MB)", "{:.1f}"),
    ("mem_end_mb", "memory at end (MB) [2]", "{:.1f}"),
    ("client_cpu_ms_per_msg", "load generator CPU per message (ms)", "{:.2f}"),
    ("sink_cpu_ms_per_msg", "sink CPU per message (ms)", "{:.2f}"),
    ("stolen_pct", "CPU taken by other guests (% of all CPUs) [3]", "{:.1f}"),
]


def stolen_share(stolen0: float, t0: float) -> float:
    """The hypervisor's ``steal`` since ``stolen0``, as a share of every CPU's time since
    ``t0``: on a shared virtual machine, the runs it is high in are the ones to doubt."""
    elapsed = (time.time() - t0) * (os.cpu_count() or 1)
    return 100 * (procstat.stolen_seconds() - stolen0) / elapsed if elapsed > 0 else 0.0


def fmt(value: Any, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _, _ in ROWS] + ["arrived", "accepted", "refused_or_failed", "with_bcc"]
    return {k: median_of(runs, k) for k in keys}


def print_report(report: dict[str, Any]) -> None:
    out = sys.stdout
    m = report["machine"]
    c = report["config"]
    print(
        f"\nERP relay benchmark  ({m['cpus']} CPUs, {m['cpu_model']}, {m['memory_mb']} MB RAM;"
        f" sink {c['sink']}",
        end="",
        file=out,
    )
    if report["scenarios"]:
        print(
            f"; load {c['driver']}, {c['users']} users,"
            f" {'one connection per message' if c['reconnect'] else 'persistent connections'}"
            f"{', each with AUTH' if c.get('auth') else ''};"
            f" median of {c['repeat']} runs",
            end="",
            file=out,
        )
    print(")", file=out)
    v = report["relay_version"]
    changed = f" + uncommitted changes in {', '.join(v['changed'])}" if v["changed"] else ""
    print(
        f"relay at commit {v['commit'] or '?'}{changed}; load average at start"
        f" {m['loadavg_at_start']:.2f}",
        file=out,
    )
    speed = report.get("speed", {})
    if speed:
        print(
            "machine speed [4]: "
            + "; ".join(
                f"{when} {s['rsa_sign_ms']:.2f} ms an RSA-2048 signature,"
                f" {s['fsync_ms']:.2f} ms an fsync"
                for when, s in speed.items()
            ),
            file=out,
        )
    if report.get("postfix_error"):
        print(f"Postfix comparison NOT run: {report['postfix_error']}", file=out)
    for sc in report["scenarios"]:
        relay, pf = sc["relay"], sc.get("postfix")
        print(f"\n{sc['title']}", file=out)
        head = f"  {'':44}{'relay':>12}"
        if pf:
            head += f"{'postfix+dkim':>14}{'relay/postfix':>15}"
        print(head, file=out)
        for key, label, pattern in ROWS:
            a = relay["median"].get(key)
            line = f"  {label:44}{fmt(a, pattern):>12}"
            if pf:
                b = pf["median"].get(key)
                ratio = a / b if isinstance(a, (int, float)) and b else None
                if key in ("client_cpu_ms_per_msg", "sink_cpu_ms_per_msg", "stolen_pct"):
                    ratio = None
                line += f"{fmt(b, pattern):>14}{fmt(ratio, '{:.2f}'):>15}"
            if a is None and (not pf or pf["median"].get(key) is None):
                continue
            print(line, file=out)
        counts = (
            f"  per run: sent {relay['median']['accepted'] or 0:.0f} accepted,"
            f" {relay['median']['arrived'] or 0:.0f} arrived,"
            f" {relay['median']['with_bcc'] or 0:.0f} with the BCC recipient,"
            f" {relay['median']['refused_or_failed'] or 0:.0f} refused (relay)"
        )
        if pf:
            counts += (
                f"; {pf['median']['arrived'] or 0:.0f} arrived,"
                f" {pf['median']['with_bcc'] or 0:.0f} with BCC (postfix)"
            )
        print(counts, file=out)
        rates = ", ".join(fmt(r.get("msgs_per_s"), "{:.1f}") for r in relay["runs"])
        line = f"  messages/s of each run: relay {rates}"
        if pf:
            line += "; postfix " + ", ".join(fmt(r.get("msgs_per_s"), "{:.1f}") for r in pf["runs"])
        print(line, file=out)
    if report["scenarios"]:
        print(
            "\n  [1] relay: the supervisor and its workers (all threads); postfix: every"
            " Postfix process (master, its live and reaped children) plus OpenDKIM",
            file=out,
        )
        print(
            "  [2] relay: sum of PSS over its processes; postfix: the same, plus OpenDKIM"
            " (shared pages counted once)",
            file=out,
        )
        print(
            "  [3] the hypervisor's steal time during the run (/proc/stat): CPU this"
            " virtual machine wanted and other guests got; compare runs with little of it",
            file=out,
        )
        print(
            "  ratios are relay/postfix: below 1 the relay is slower (messages/s), above 1"
            " it is slower or costlier (latency, CPU)",
            file=out,
        )
    if speed:
        print(
            "  [4] the median of 200 RSA-2048 signatures through OpenSSL, and of 100 fsyncs of"
            " a 2 KB overwrite on the work directory's disk: one each is a relayed message's"
            " largest costs, so runs on days these differ are not comparable",
            file=out,
        )
    if report.get("big"):
        b = report["big"]
        print(f"\nbig message: {b['message_bytes'] / MB:.1f} MB, reply {b['reply']!r}", file=out)
        print(
            f"  relay peak RSS {b['peak_rss_mb']:.1f} MB (before the message:"
            f" {b['peak_rss_before_mb']:.1f}; when the 250 came: {b['peak_rss_at_reply_mb']:.1f});"
            f" target < {b['target_mb']} MB:"
            f" {'yes' if b['within_target'] else 'NO'}",
            file=out,
        )
        print(
            f"  accept latency {fmt(b['accept_latency_s'], '{:.2f}')} s,"
            f" end-to-end {fmt(b['e2e_s'], '{:.2f}')} s, delivered: {b['delivered']}",
            file=out,
        )
    if report.get("idle"):
        i = report["idle"]
        print(
            f"\nidle connections: {i['connections_open']} of {i['connections_requested']} open"
            f" for {i['hold_s']:g} s",
            file=out,
        )
        print(
            f"  relay RSS {i['rss_mb']:.1f} MB (before {i['rss_before_mb']:.1f} MB,"
            f" {i['kb_per_connection']:.1f} KB per connection), peak {i['peak_rss_mb']:.1f} MB;"
            f" target < {i['target_mb']} MB: {'yes' if i['within_target'] else 'NO'};"
            f" relay CPU {i['relay_cpu_s']:.2f} s",
            file=out,
        )
    if report.get("profile"):
        p = report["profile"]
        if "error" in p:
            print(f"\nprofile: {p['error']}", file=out)
        else:
            print(
                f"\nprofile of the relay under scenario ({p['scenario']}), {p['samples']} samples"
                f" (py-spy --gil: the thread holding the GIL): {p['file']}",
                file=out,
            )
            print("  self time (the function itself was on CPU):", file=out)
            for row in p["self"][:12]:
                print(f"    {row['share'] * 100:5.1f}%  {row['function']}", file=out)
            print("  inclusive (the function or something it called):", file=out)
            for row in p["inclusive"][:15]:  # entry points and the event loop left out
                print(f"    {row['share'] * 100:5.1f}%  {row['function']}", file=out)


# --- main -----------------------------------------------------------------------------


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    quick = args.quick
    if args.rate and not (args.size or args.sessions):
        raise SystemExit("--rate paces a custom scenario: give --sessions or --size too")
    if args.size or args.sessions:
        size = args.size or 2048
        n = args.messages or (40 if quick else (300 if size > 16 * KB else 1000))
        return [Scenario("custom", size, args.sessions or 20, n, rate=args.rate)]
    wanted = args.scenarios
    if wanted is None:
        wanted = "" if (args.big or args.idle) else "a,b,c,h"
    table = {
        "a": Scenario("a", 2 * KB, 20, args.messages or (60 if quick else 1000)),
        "b": Scenario("b", 100 * KB, 20, args.messages or (30 if quick else 300)),
        "c": Scenario("c", 2 * KB, 1, args.messages or (40 if quick else 1000)),
        "h": Scenario("h", 2 * KB, 20, args.messages or (60 if quick else 1000), paced=True),
    }
    chosen = [s.strip() for s in wanted.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in table]
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(unknown)} (a, b, c, h)")
    if "h" in chosen and ("a" not in chosen or chosen.index("a") > chosen.index("h")):
        raise SystemExit("scenario h is paced at half of (a)'s rate: list a before it")
    return [table[s] for s in chosen]


def size_arg(text: str) -> int:
    text = text.strip().upper()
    for suffix, factor in (("KB", KB), ("K", KB), ("MB", MB), ("M", MB), ("B", 1)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Default scenarios: (a) 2 KB, 20 sessions, 1000 messages; (b) 100 KB, 20"
        " sessions, 300 messages; (c) 2 KB, 1 session, 1000 messages.",
    )
    p.add_argument("--messages", type=int, help="messages per run (overrides the defaults)")
    p.add_argument("--repeat", type=int, help="runs per scenario; the median is reported (3)")
    p.add_argument("--sessions", type=int, help="a single custom scenario with this many sessions")
    p.add_argument(
        "--rate",
        type=float,
        help="pace the custom scenario at this many messages/s (both sides), for"
        " accept latency below saturation",
    )
    p.add_argument(
        "--size",
        type=size_arg,
        help="a single custom scenario with this message size (e.g. 2KB, 100KB)",
    )
    p.add_argument(
        "--scenarios",
        help="which default scenarios: a,b,c,h (default all; none when only --big/--idle"
        " are given); h is (a) paced at half the rate (a) reached, for accept latency",
    )
    p.add_argument("--quick", action="store_true", help="small counts, 1 repeat: a smoke run")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--save", type=Path, metavar="FILE", help="also write the JSON document here")
    p.add_argument(
        "--compare-postfix",
        action="store_true",
        help="also run a private Postfix + OpenDKIM instance with the same load",
    )
    p.add_argument(
        "--big",
        type=float,
        metavar="MB",
        help="send one message of MB megabytes"
        " and report the relay's peak RSS (target < 120 MB for 25)",
    )
    p.add_argument(
        "--idle",
        type=int,
        metavar="N",
        help="hold N idle connections to the relay and report its RSS (target < 150 MB for 1000)",
    )
    p.add_argument("--idle-seconds", type=float, default=5.0, help="how long to hold them (5)")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="profile the relay with py-spy"
        " during one extra (unmeasured) run of the first scenario",
    )
    p.add_argument(
        "--driver",
        choices=["python", "smtp-source"],
        default="python",
        help="load generator: bench/load.py (default; measures accept and end-to-end"
        " latency) or Debian's smtp-source (throughput and CPU only)",
    )
    p.add_argument(
        "--reconnect",
        action="store_true",
        help="one new connection per message (smtp-source's default behaviour)",
    )
    p.add_argument(
        "--auth",
        action="store_true",
        help="every connection logs in (AUTH PLAIN) first, as ERPs do; with --reconnect once"
        " per message (the relay only: the Postfix set-up has no SASL)",
    )
    p.add_argument(
        "--sink",
        choices=["auto", "smtp-sink", "python"],
        default="auto",
        help="the counting sink: smtp-sink when installed (auto), or bench/sink.py",
    )
    p.add_argument("--users", type=int, default=1000, help="users of the tenant (1000)")
    p.add_argument(
        "--suppressed",
        type=int,
        default=100_000,
        help="entries on the relay's suppression list, none a recipient (100000)",
    )
    p.add_argument(
        "--workers",
        help="the relay's worker processes (policy 'workers'; default: auto, one per CPU)",
    )
    p.add_argument("--workdir", help="where the temporary directory goes (default: /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the temporary files")
    args = p.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.auth and (args.compare_postfix or args.driver == "smtp-source"):
        p.error("--auth needs the python driver and no --compare-postfix")
    if args.driver == "smtp-source" and not smtp_source_available():
        say("smtp-source is not installed: using bench/load.py")
        args.driver = "python"
    return args


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the bench like Ctrl-C: everything cleaned up


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    raise_fd_limit()
    signal.signal(signal.SIGTERM, _interrupt)
    # Ctrl-C, also when started in the background (where SIGINT may be ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    chosen = scenarios(args)
    report: dict[str, Any] = {
        "machine": machine(),
        "relay_version": relay_version(),
        "config": {
            "repeat": args.repeat,
            "driver": args.driver,
            "reconnect": args.reconnect,
            "auth": args.auth,
            "users": args.users,
            "suppressed": args.suppressed,
            "sink": None,
        },
        "scenarios": [],
        "postfix_error": None,
    }
    started = time.monotonic()
    bench = Bench(args)
    interrupted = False
    try:
        say("machine speed: RSA signatures and fsyncs ...")
        report["speed"] = {"start": calibrate.measure(bench.work)}
        bench.start_sinks()
        assert bench.relay_sink is not None
        report["config"]["sink"] = bench.relay_sink.kind
        if args.compare_postfix and chosen:
            bench.start_postfix()
            report["postfix_error"] = bench.postfix_error
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for rep in range(args.repeat):
            for sc in chosen:
                order = ["relay", "postfix"] if rep % 2 == 0 else ["postfix", "relay"]
                for side in order:
                    if side == "postfix" and bench.postfix is None:
                        continue
                    rate = sc.rate
                    if sc.paced:  # half of what this side reached in (a), this repetition
                        rate = 0.5 * (runs[("a", side)][-1].get("msgs_per_s") or 1.0)
                    say(f"run {rep + 1}/{args.repeat} {sc.title}: {side} ...")
                    if side == "relay":
                        run = bench.run_relay(sc, rep, rate)
                    else:
                        run = bench.run_postfix(sc, rep, rate)
                    if rate:
                        run["paced_at_per_s"] = rate
                    runs.setdefault((sc.name, side), []).append(run)
                    say(
                        "    "
                        + ", ".join(
                            f"{k}={fmt(run.get(k), '{:.1f}')}"
                            for k in ("msgs_per_s", "accept_p50_ms", "e2e_p50_ms", "cpu_ms_per_msg")
                        )
                    )
        for sc in chosen:
            entry: dict[str, Any] = {
                "name": sc.name,
                "title": sc.title,
                "size": sc.size,
                "sessions": sc.sessions,
                "messages": sc.messages,
            }
            for side in ("relay", "postfix"):
                if (sc.name, side) in runs:
                    r = runs[(sc.name, side)]
                    entry[side] = {"median": summarize(r), "runs": r}
            if "postfix" in entry:
                a, b = entry["relay"]["median"], entry["postfix"]["median"]
                entry["ratio_relay_over_postfix"] = {
                    k: a[k] / b[k]
                    for k in a
                    if isinstance(a.get(k), (int, float))
                    and isinstance(b.get(k), (int, float))
                    and b[k]
                }
            report["scenarios"].append(entry)
        if args.big:
            say(f"big message: {args.big:g} MB ...")
            report["big"] = bench.run_big(args.big)
        if args.idle:
            say(f"idle connections: {args.idle} for {args.idle_seconds:g} s ...")
            report["idle"] = bench.run_idle(args.idle, args.idle_seconds)
        if args.profile:
            sc = chosen[0] if chosen else Scenario("a", 2 * KB, 20, 60 if args.quick else 1000)
            say(f"profile: {sc.title} under py-spy ...")
            report["profile"] = {"scenario": sc.name, **bench.run_profile(sc, args.profile)}
        report["speed"]["end"] = calibrate.measure(bench.work)
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: stopping everything")
    finally:
        bench.stop_all()
        bench.remove_files()
    report["elapsed_s"] = time.monotonic() - started
    if interrupted:
        return 130
    if args.save:
        args.save.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        print()
    else:
        print_report(report)
        print(f"\n(total {report['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
