"""The accepting path's own work, without sockets, disk or other processes.

``bench/run.py`` measures the relay whole, on a shared machine whose speed
moves by a tenth from one run to the next: a change that saves a few percent
of the Python a message costs cannot be told from that noise there. This
times ``pipeline.prepare`` (identify, classify, decide, rewrite, sign) over
the benchmark's own invoices and policy, in one process, so two trees can be
compared run for run::

    .venv/bin/python bench/prepare.py            # median microseconds a message
    .venv/bin/python bench/prepare.py --profile  # and where they go (cProfile)

About 200 µs of what it prints is the RSA-2048 signature (``bench/calibrate.py``).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import load, relayside  # noqa: E402
from relay import pipeline  # noqa: E402
from relay.policy.load import load as load_policy  # noqa: E402
from relay.submission import Submission  # noqa: E402


def submissions(directory: Path, count: int) -> tuple[object, list[Submission]]:
    """The benchmark's policy (1,000 users, RSA-2048) and ``count`` of its 2 KB invoices,
    as aiosmtpd hands them over: dot-unstuffed."""
    users = load.Users.make(1000)
    key = relayside.make_key(directory / "keys")
    path = directory / "relay.yaml"
    relayside.write_policy(path, 2525, 2526, key, directory / "state", users)
    jobs = load.jobs("prepare", count, 2048, users)
    return load_policy(path), [
        Submission("bench", "127.0.0.1", None, j.mail_from, j.rcpts, _unstuffed(j.data))
        for j in jobs
    ]


def _unstuffed(data: bytes) -> bytes:
    lines = data.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def timed(policy: object, subs: list[Submission], rounds: int) -> list[float]:
    """Microseconds a message, one figure a round over all of ``subs``."""
    for one in subs[:50]:  # warm: caches, the key's first use
        pipeline.prepare(policy, one)  # type: ignore[arg-type]
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        for one in subs:
            pipeline.prepare(policy, one)  # type: ignore[arg-type]
        out.append((time.perf_counter() - start) / len(subs) * 1e6)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", action="store_true", help="also print cProfile's top 30")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="relay-prepare-") as tmp:
        policy, subs = submissions(Path(tmp), args.messages)
        rounds = timed(policy, subs, args.rounds)
        print(
            f"prepare: {statistics.median(rounds):.1f} µs a message (median of"
            f" {len(rounds)} rounds of {len(subs)}; fastest {min(rounds):.1f})"
        )
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(timed, policy, subs, 1)
            pstats.Stats(profile).sort_stats("tottime").print_stats(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
