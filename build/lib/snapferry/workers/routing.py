"""Where this process routes a host's work: the host's own name, or its keyed alias while
payload encryption is on (the alias itself is :func:`workflows.routing.host_alias`)."""

from __future__ import annotations

from .codec import KeyRing


def routed_host(host: str) -> str:
    """``host`` as it is routed: its alias when encryption is on, else itself."""
    ring = KeyRing.from_env()
    return ring.host_alias(host) if ring else host
