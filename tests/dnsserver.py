"""A DNS server on 127.0.0.1 (UDP) that answers TXT queries from a table, for the DKIM check."""

from __future__ import annotations

import socket
import threading

import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset


class DnsServer:
    """``records``: name -> its TXT records, each a list of strings; a name not in it
    does not exist (NXDOMAIN). ``cnames``: name -> the name it is an alias of, answered
    without following it, as an authoritative server does for another zone.
    ``referrals``: name -> the servers it is handed to (NS in the authority section).
    ``recursive``: a CNAME to a name that does not exist is answered as a resolver
    that followed it answers: the CNAME, and NXDOMAIN.
    ``asked`` lists the names queried, in order."""

    def __init__(
        self,
        records: dict[str, list[list[bytes]]],
        cnames: dict[str, str] | None = None,
        referrals: dict[str, list[str]] | None = None,
        recursive: bool = False,
    ) -> None:
        self.recursive = recursive
        self.records = {dns.name.from_text(n): r for n, r in records.items()}
        self.cnames = {dns.name.from_text(n): t for n, t in (cnames or {}).items()}
        self.referrals = {dns.name.from_text(n): t for n, t in (referrals or {}).items()}
        self.asked: list[str] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, client = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            self._sock.sendto(self._answer(query).to_wire(), client)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        reply = dns.message.make_response(query)
        question = query.question[0]
        self.asked.append(question.name.to_text())
        found = self.records.get(question.name)
        if question.name in self.cnames:
            target = self.cnames[question.name]
            reply.answer.append(dns.rrset.from_text(question.name, 300, "IN", "CNAME", target))
            if self.recursive and dns.name.from_text(target) not in self.records:
                reply.set_rcode(dns.rcode.NXDOMAIN)
        elif question.name in self.referrals:
            servers = self.referrals[question.name]
            reply.authority.append(dns.rrset.from_text(question.name, 300, "IN", "NS", *servers))
        elif found is None:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        elif found and question.rdtype == dns.rdatatype.TXT:
            rdatas = [
                dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings)
                for strings in found
            ]
            reply.answer.append(dns.rrset.from_rdata_list(question.name, 300, rdatas))
        return reply
