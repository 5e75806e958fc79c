"""One way to get a Temporal client, with the pydantic converter every payload needs."""

from __future__ import annotations

import asyncio
import time

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from activities.settings import Settings


async def connect(settings: Settings, *, wait_s: float = 15.0) -> Client:
    """Connect, retrying for ``wait_s``: a server that has just opened its port answers
    "Frontend is not healthy yet" for a moment, and workers may start before it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await Client.connect(
                settings.temporal_address,
                namespace=settings.namespace,
                data_converter=pydantic_data_converter,
            )
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
