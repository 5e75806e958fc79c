"""The backup's reader of a clone's flat disk over the datastore file protocol."""

from __future__ import annotations

import http.client
import logging

from ...errors import HypervisorUnavailable, SourceGone
from ...storage.reader import DataExtent
from .session import VsphereSession, file_access_denied

UPLOAD_CHUNK = 8 * 1024 * 1024
STREAM_WINDOW = 1 << 30  # one ranged datastore GET per GiB of disk (or to its end)
DROP_REPORT_BYTES = 256 * 1024 * 1024  # log the skip of an unranged GET this often

log = logging.getLogger(__name__)


class DatastoreReader:
    """The copy engine's reader for one flat disk on a datastore: few, large ranged GETs.

    The whole disk is one data extent (the datastore protocol says nothing about holes); the
    engine still writes all-zero chunks as holes, so the backup stays sparse.

    One GET per window (``STREAM_WINDOW``, 1 GiB, or to the end of the disk) instead of
    one per 8 MiB chunk: the engine's chunks are read from that response's body, forward,
    into its own buffers (nothing is buffered here). Each window is read to its end, so
    the kept-alive connection carries the next window's GET. A read somewhere else than
    where the stream is (a resumed copy) drops the stream, and its connection with it
    (the rest of a window cannot be skipped for free), and asks again from that offset.
    A transport error (a reset, a kept-alive connection the server had closed, a short
    body) drops the stream too and reopens it where the read had got to; a second error
    in a row without progress fails the read (``HypervisorUnavailable``, retried from the
    engine's checkpoint). Heartbeats and progress are the engine's, per chunk, as before.

    Ranges are not guaranteed: VMware documents ``/folder`` GET without them, and direct
    ESXi has been seen answering a ranged GET with a plain 200 and the whole file
    (PegaProx/project-pegaprox#438). Then the reader keeps that one response and reads it
    forward, chunk after chunk; a resumed copy reads and drops the bytes before its
    checkpoint (logged as it goes), as the XenServer export reader does. The network
    repeats what the store already has; the store does not.

    A GET answered 401 (the session expired under a long transfer) logs in again and is
    sent again at once (see ``_get``): the copy goes on in the same attempt.

    A delta's reader is given the areas Changed Block Tracking reports changed (``areas``,
    sorted ``(start, length)``): those are its data extents, and everything else is
    unchanged since its parent. Each GET then ends where its area ends (or a window
    further, whichever is first), and is read to that end, so that the next area's GET goes
    over the same kept-alive connection and nothing between two areas crosses the wire."""

    def __init__(
        self,
        session: VsphereSession,
        ds: str,
        path: str,
        size: int,
        *,
        window: int = 0,
        areas: list[tuple[int, int]] | None = None,
    ) -> None:
        self.session, self.ds, self.path = session, ds, path
        self.virtual_size = size
        self.window = window or STREAM_WINDOW
        self._conn: http.client.HTTPConnection | None = None
        self._stream: http.client.HTTPResponse | None = None
        self._stream_pos = 0  # the guest offset of the stream's next byte
        self._stream_end = 0  # where its body ends (the window's end, or the disk's)
        self.ranges = True  # until the server shows it ignores them
        self.dropped = 0  # bytes read and thrown away to reach a resume point
        self.requests = 0  # GETs sent (the tests and the benchmark count them)
        self.areas = areas

    def data_extents(self) -> list[DataExtent]:
        if self.areas is not None:
            return [
                DataExtent(start=s, length=n, path=self.path, host_offset=s) for s, n in self.areas
            ]
        return [DataExtent(start=0, length=self.virtual_size, path=self.path, host_offset=0)]

    def _get(self, headers: dict[str, str]) -> http.client.HTTPResponse:
        """One GET; a 401 logs in again and asks once more, inline. The session may have
        expired during the transfer (nothing documents that ``/folder`` traffic keeps it
        alive, and the copy of a large disk outlives vCenter's 30 idle minutes), and the
        copy must not lose its attempt for that."""
        url = self.session.file_url(self.ds, self.path)
        for renewed in (False, True):
            if self._conn is None:
                self._conn = self.session.connection()
            cookie = self.session.cookie()
            self.requests += 1
            self._conn.request("GET", url, None, {"Cookie": cookie, **headers})
            resp = self._conn.getresponse()
            if resp.status == 404:
                resp.read()
                raise SourceGone(f"[{self.ds}] {self.path} is gone from the datastore")
            if resp.status == 403:
                resp.read()
                raise file_access_denied("GET", self.ds, self.path)
            if resp.status != 401:
                return resp
            resp.read()
            if renewed:
                break
            log.info("[%s] %s: the vCenter session expired; logging in again", self.ds, self.path)
            self.session.renew(cookie)
        raise HypervisorUnavailable(
            f"datastore GET of [{self.ds}] {self.path} answered 401 after a new login"
        )

    def read_range(self, extent: DataExtent, guest_offset: int, view: memoryview) -> None:
        done, failed = 0, False
        try:
            while done < len(view):
                offset = guest_offset + done
                try:
                    if not self._stream_serves(offset):
                        self._open(offset, extent.start + extent.length)
                    got = self._fill(offset, view[done:])
                except (OSError, http.client.HTTPException) as exc:
                    self.close()
                    if failed:
                        raise HypervisorUnavailable(
                            f"datastore read of {self.path} failed at {offset}: {exc}"
                        ) from exc
                    failed = True
                    log.warning(
                        "datastore read of [%s] %s failed at %d (%s): asking again from there",
                        self.ds,
                        self.path,
                        offset,
                        exc,
                    )
                    continue
                done, failed = done + got, False
        except Exception:
            self.close()
            raise

    def _stream_serves(self, offset: int) -> bool:
        """Whether the open stream can go on to ``offset``: at it, or (a whole-file 200)
        before it, to be read forward and dropped."""
        if self._stream is None or self._stream_pos >= self._stream_end:
            return False
        if self.ranges:
            return self._stream_pos == offset
        return self._stream_pos <= offset < self._stream_end

    def _open(self, offset: int, extent_end: int) -> None:
        self._drop_stream()
        end = min(offset + self.window, self.virtual_size)
        if self.areas is not None:  # a delta: to the end of this changed area
            end = min(end, extent_end)
        if not self.ranges:
            resp = self._get({})
            if resp.status != 200:
                resp.read()
                raise HypervisorUnavailable(f"datastore GET answered {resp.status} {resp.reason}")
            self._open_whole(resp)
            return
        resp = self._get({"Range": f"bytes={offset}-{end - 1}"})
        if resp.status == 206:
            served = resp.getheader("Content-Range", "")
            length = resp.getheader("Content-Length")
            if not served.startswith(f"bytes {offset}-{end - 1}/") or (
                length is not None and int(length) != end - offset
            ):
                resp.close()
                raise HypervisorUnavailable(
                    f"datastore GET of {self.path} served {served!r} ({length} bytes),"
                    f" not bytes {offset}-{end - 1}"
                )
            self._stream, self._stream_pos, self._stream_end = resp, offset, end
            return
        if resp.status != 200:
            resp.read()
            raise HypervisorUnavailable(f"datastore GET answered {resp.status} {resp.reason}")
        log.warning(
            "datastore GET of [%s] %s ignored Range (200, no Content-Range): reading"
            " the whole file forward instead",
            self.ds,
            self.path,
        )
        self.ranges = False
        self._open_whole(resp)

    def _open_whole(self, resp: http.client.HTTPResponse) -> None:
        length = resp.getheader("Content-Length")
        if length is not None and int(length) != self.virtual_size:
            resp.close()
            raise HypervisorUnavailable(
                f"datastore GET of {self.path} sent {length} bytes; the disk has"
                f" {self.virtual_size}"
            )
        self._stream, self._stream_pos, self._stream_end = resp, 0, self.virtual_size

    def _fill(self, offset: int, view: memoryview) -> int:
        """Read what the stream has for ``view`` (at most to its end); returns the count."""
        assert self._stream is not None
        if self._stream_pos < offset:
            self._skip_to(offset)
        want = min(len(view), self._stream_end - self._stream_pos)
        got = self._stream.readinto(view[:want])
        if not got:
            raise http.client.IncompleteRead(b"", self._stream_end - self._stream_pos)
        self._stream_pos += got
        if self._stream_pos == self._stream_end:
            self._stream = None  # read to its end: the connection is free for the next GET
        return got

    def _skip_to(self, offset: int) -> None:
        """Read and drop a whole-file stream up to ``offset`` (no ranges: a resume)."""
        assert self._stream is not None
        log.warning(
            "[%s] %s: no ranges; reading and dropping %d bytes to resume at %d",
            self.ds,
            self.path,
            offset - self._stream_pos,
            offset,
        )
        scratch = bytearray(min(UPLOAD_CHUNK, offset - self._stream_pos))
        next_report = self._stream_pos + DROP_REPORT_BYTES
        while self._stream_pos < offset:
            want = min(len(scratch), offset - self._stream_pos)
            got = self._stream.readinto(memoryview(scratch)[:want])
            if not got:
                raise http.client.IncompleteRead(b"", offset - self._stream_pos)
            self._stream_pos += got
            self.dropped += got
            if self._stream_pos >= next_report or self._stream_pos == offset:
                log.warning(
                    "[%s] %s: dropped %d of %d bytes before the resume point",
                    self.ds,
                    self.path,
                    self.dropped,
                    offset,
                )
                next_report = self._stream_pos + DROP_REPORT_BYTES

    def _drop_stream(self) -> None:
        """Give up an unfinished stream, and its connection: its body is still coming."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def close(self) -> None:
        self._drop_stream()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
