"""The SMTP side facing the ERPs: aiosmtpd listeners that hand each message to the pipeline."""

from __future__ import annotations

from relay.ingress.handler import LOCAL_ERROR, Process, RelayHandler
from relay.ingress.listen import Ingress, Sockets, bind, loopback_only, start

__all__ = [
    "LOCAL_ERROR",
    "Ingress",
    "Process",
    "RelayHandler",
    "Sockets",
    "bind",
    "loopback_only",
    "start",
]
