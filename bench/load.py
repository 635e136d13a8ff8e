"""The load: realistic invoices, and an asyncio SMTP client that sends them.

Each session keeps one connection open (EHLO once, then MAIL, RCPT, DATA
per message, like an ERP that batches its invoices) unless ``reconnect`` is
set (one connection per message, like smtp-source's default). For every
message it records the wall-clock time the final ``.`` was written and the
time the reply arrived: the accept latency (end of DATA -> 250).

Every wait has a timeout, so a stuck server ends the run instead of hanging it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import random
import time
from dataclasses import dataclass, field
from email.utils import formatdate

END_MARK = b"bench-end "  # last body line; a sink file without it is incomplete
ID_HEADER = b"X-Bench-Id: "


@dataclass(frozen=True)
class Job:
    token: str
    mail_from: str
    rcpts: tuple[str, ...]
    data: bytes  # CRLF lines, dot-stuffed, ending with CRLF (without the final ".")


@dataclass
class Result:
    token: str
    code: int = 0
    reply: str = ""
    sent: float = 0.0  # wall clock: end of DATA written
    answered: float = 0.0  # wall clock: reply to DATA read
    latency: float = 0.0  # perf_counter difference, seconds


@dataclass
class Users:
    """The tenant's users: (name, address); customers are made up per message."""

    people: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def make(cls, count: int, domain: str = "acme.example") -> Users:
        first = ["Jan", "Kari", "Ola", "Ingrid", "Lars", "Marit", "Per", "Sofie", "Erik", "Nina"]
        last = ["Janssens", "Nordmann", "Hansen", "Olsen", "Berg", "Dahl", "Lund", "Moen"]
        people = [
            (
                f"{first[i % len(first)]} {last[(i // len(first)) % len(last)]} {i:04d}",
                f"user{i:04d}@{domain}",
            )
            for i in range(count)
        ]
        return cls(people)


_ATTACHMENT_CACHE: dict[int, list[bytes]] = {}


def _attachment_lines(raw_bytes: int) -> list[bytes]:
    """Base64 lines (76 columns) of pseudo-random 'PDF' bytes, cached per size."""
    if raw_bytes not in _ATTACHMENT_CACHE:
        rng = random.Random(raw_bytes)
        blob = b"%PDF-1.4\n" + rng.randbytes(max(raw_bytes - 9, 0))
        text = base64.b64encode(blob)
        _ATTACHMENT_CACHE[raw_bytes] = [text[i : i + 76] for i in range(0, len(text), 76)]
    return _ATTACHMENT_CACHE[raw_bytes]


def invoice(seq: int, size: int, user: tuple[str, str], customer: str, token: str) -> bytes:
    """An ERP invoice of about ``size`` bytes: a short text part and a PDF attachment."""
    name, address = user
    head = (
        f'From: "{name}" <{address}>\r\n'
        f"To: {customer}\r\n"
        f"Subject: Invoice {seq}\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-ID: <{token}@erp.acme.example>\r\n"
        f"X-Bench-Id: {token}\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="=_invoice_boundary"\r\n'
        "\r\n"
        "--=_invoice_boundary\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "Dear customer,\r\n\r\n"
        f"please find attached invoice {seq}. Payment is due within 14 days.\r\n\r\n"
        f"Kind regards,\r\n{name}\r\n"
        "--=_invoice_boundary\r\n"
        f'Content-Type: application/pdf; name="invoice-{seq}.pdf"\r\n'
        f'Content-Disposition: attachment; filename="invoice-{seq}.pdf"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        "\r\n"
    ).encode()
    tail = b"--=_invoice_boundary--\r\n" + END_MARK + token.encode() + b"\r\n"
    room = max(size - len(head) - len(tail), 80)
    raw = room * 76 // 78 * 3 // 4  # base64 inflation and CRLF per 76 columns
    lines = _attachment_lines(raw)
    return head + b"\r\n".join(lines) + b"\r\n" + tail


def jobs(tag: str, count: int, size: int, users: Users, seed: int = 1) -> list[Job]:
    rng = random.Random(seed)
    out = []
    for n in range(count):
        user = users.people[rng.randrange(len(users.people))]
        customer = f"customer{rng.randrange(100000)}@buyer{rng.randrange(500)}.example"
        token = f"{tag}-{n:06d}"
        data = invoice(10000 + n, size, user, customer, token)
        out.append(Job(token, user[1], (customer,), data))
    return out


def run(coro):
    """asyncio.run, on uvloop when it is installed (the client should cost little CPU)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


class SmtpError(Exception):
    pass


async def _reply(reader: asyncio.StreamReader, timeout: float) -> tuple[int, str]:
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise SmtpError("connection closed by server")
        lines.append(line.decode("latin-1").rstrip())
        if len(line) < 4 or line[3:4] != b"-":
            break
    return int(lines[-1][:3]), lines[-1]


async def _command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str, timeout: float
) -> tuple[int, str]:
    writer.write(line.encode() + b"\r\n")
    return await _reply(reader, timeout)


async def _open(host: str, port: int, timeout: float, login: tuple[str, str] | None = None):
    """Greeting, EHLO and, with ``login``, AUTH PLAIN."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    code, text = await _reply(reader, timeout)
    if code != 220:
        writer.close()
        raise SmtpError(f"greeting: {text}")
    code, text = await _command(reader, writer, "EHLO erp.bench.example", timeout)
    if code != 250:
        writer.close()
        raise SmtpError(f"EHLO: {text}")
    if login is not None:
        blob = base64.b64encode(f"\0{login[0]}\0{login[1]}".encode()).decode()
        code, text = await _command(reader, writer, f"AUTH PLAIN {blob}", timeout)
        if code != 235:
            writer.close()
            raise SmtpError(f"AUTH: {text}")
    return reader, writer


async def _transaction(reader, writer, job: Job, timeout: float) -> Result:
    result = Result(job.token)
    code, text = await _command(reader, writer, f"MAIL FROM:<{job.mail_from}>", timeout)
    if code != 250:
        result.code, result.reply = code, text
        await _command(reader, writer, "RSET", timeout)
        return result
    for rcpt in job.rcpts:
        code, text = await _command(reader, writer, f"RCPT TO:<{rcpt}>", timeout)
        if code not in (250, 251):
            result.code, result.reply = code, text
            await _command(reader, writer, "RSET", timeout)
            return result
    code, text = await _command(reader, writer, "DATA", timeout)
    if code != 354:
        result.code, result.reply = code, text
        return result
    writer.write(job.data)
    writer.write(b".\r\n")
    # end of DATA: the transport has just tried to send it all (on loopback the
    # kernel takes it at once); stamping after drain() would add the time this
    # coroutine waits for its turn on a busy event loop
    result.sent = time.time()
    start = time.perf_counter()
    await asyncio.wait_for(writer.drain(), timeout)
    result.code, result.reply = await _reply(reader, timeout)
    result.latency = time.perf_counter() - start
    result.answered = time.time()
    return result


async def _close(writer: asyncio.StreamWriter, reader=None, timeout: float = 2.0) -> None:
    try:
        if reader is not None:
            await _command(reader, writer, "QUIT", timeout)
    except (OSError, SmtpError, TimeoutError, ValueError):
        pass
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), timeout)


async def drive(
    host: str,
    port: int,
    work: list[Job],
    sessions: int,
    reconnect: bool = False,
    timeout: float = 60.0,
    rate: float | None = None,
    login: tuple[str, str] | None = None,
) -> list[Result]:
    """Send every job over ``sessions`` concurrent connections; one Result per job.
    With ``login`` every connection logs in first.

    With ``rate`` (messages/s) the n-th message starts no sooner than n/rate
    seconds in: an open-loop load below saturation, for latency at that rate.
    """
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in work:
        queue.put_nowait(job)
    results: list[Result] = []
    loop = asyncio.get_running_loop()
    started, taken = loop.time(), itertools.count()

    async def session() -> None:
        conn = None
        while True:
            try:
                job = queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if rate:
                await asyncio.sleep(max(0.0, started + next(taken) / rate - loop.time()))
            try:
                if conn is None:
                    conn = await _open(host, port, timeout, login)
                results.append(await _transaction(*conn, job, timeout))
            except (OSError, SmtpError, TimeoutError, ValueError) as exc:
                results.append(Result(job.token, 0, f"client error: {exc!r}"))
                if conn is not None:
                    await _close(conn[1])
                conn = None
                continue
            if reconnect:
                await _close(conn[1], conn[0])
                conn = None
        if conn is not None:
            await _close(conn[1], conn[0])

    await asyncio.gather(*(session() for _ in range(max(1, min(sessions, len(work))))))
    return results


async def hold_idle(
    host: str, port: int, count: int, seconds: float, measure, timeout: float = 30.0
) -> tuple[int, object]:
    """Open ``count`` connections (greeting + EHLO each), keep them idle for
    ``seconds``, call ``measure()`` while they are all open, then QUIT them.
    Returns (connections actually open, what measure returned)."""
    opened: list = []
    gate = asyncio.Semaphore(50)  # do not overflow the listen backlog

    async def one() -> None:
        async with gate:
            with contextlib.suppress(OSError, SmtpError, TimeoutError):
                opened.append(await _open(host, port, timeout))

    try:
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), timeout * 4)
        await asyncio.sleep(seconds)
        alive = 0
        for reader, writer in opened:  # still open, not timed out by the server?
            if not reader.at_eof() and not writer.is_closing():
                alive += 1
        return alive, measure()
    finally:
        await asyncio.gather(*(_close(w, r, 5.0) for r, w in opened), return_exceptions=True)
