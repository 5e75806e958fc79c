"""A dev server that dies at start-up (a port of its own taken meanwhile) is started again;
one that never stays up is refused with a clear error, not waited for forever."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from snapferry.workers.stack import alive, free_port, spawn, start_dev_server, terminate

LISTEN = (
    "import socket, sys, time\n"
    "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
    "time.sleep(60)\n"
)
# Listens, then dies at once: what a dev server whose history port was taken does.
LISTEN_THEN_DIE = LISTEN.replace("time.sleep(60)", "time.sleep(0.05)")


def test_a_server_that_dies_after_listening_is_started_again(tmp_path: Path) -> None:
    port = free_port()
    commands = iter(
        [
            [sys.executable, "-c", LISTEN_THEN_DIE, str(port)],
            [sys.executable, "-c", LISTEN, str(port)],
        ]
    )
    started: list[int] = []

    def start(cmd: list[str]) -> int:
        started.append(spawn(cmd, tmp_path / "server.log"))
        return started[-1]

    pid = start_dev_server(start, lambda: next(commands), "127.0.0.1", port)
    try:
        assert len(started) == 2 and pid == started[1] and alive(pid)
        assert not alive(started[0])
    finally:
        terminate(pid)


def test_a_server_that_never_stays_up_is_refused(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(RuntimeError, match=f"did not stay up on 127.0.0.1:{port} after 2 tries"):
        start_dev_server(
            lambda cmd: spawn(cmd, tmp_path / "server.log"),
            lambda: [sys.executable, "-c", LISTEN_THEN_DIE, str(port)],
            "127.0.0.1",
            port,
            attempts=2,
        )
