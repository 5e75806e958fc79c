"""dom0's side of every data transfer: the per-VDI attach automaton, and the HTML page
XAPI writes into a body it already started with ``200 OK``.

Each export and import block-attaches its VDI to dom0 (``sm_fs_ops.ml``
``with_block_attached_device``: a dom0 VBD, plugged RO for an export, RW for an import).
The SMAPIv1 wrapper keeps one state per VDI per host across all its datapaths, under a
per-VDI lock (``storage_smapiv1_wrapper.ml`` ``with_vdi`` l.410-412, ``perform_nolock``
l.468-511): it computes the VDIs' "superstate" before and after the new datapath's
operation and the SM operations between them (``vdi_automaton.ml`` ``superstate``
l.95-115, ``-`` l.120-153). Activated RO to Activated RW has no operation
(``No_operation``), which the wrapper reports as ``Illegal_transition`` (l.505-506); xapi
turns a storage error it has no code for into ``INTERNAL_ERROR [Printexc.to_string e]``
(``storage_utils.ml`` ``transform_storage_exn``, the last case). RW then RO stays RW, and
two RW datapaths are allowed (``ro_rw`` l.56-66).

An export keeps its RO datapath until vhd-tool stops writing: at the end of the disk, or
when a write into a socket the client closed fails; the detach then takes a moment. The
simulator holds the datapath ``linger_s`` seconds after a dropped export (1 s by default,
``POST /sim/attach-linger``), and at once releases it after a complete one.
"""

from __future__ import annotations

import itertools
import threading
from html import escape

from .model import XapiError


class Datapaths:
    """The dom0 datapaths per (host, VDI): id -> "RO" | "RW"."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: dict[tuple[str, str], dict[int, str]] = {}
        self.linger_s = 1.0
        self.refused = 0  # Illegal_transition answers so far (GET /sim/datapaths)
        self._ids = itertools.count(1)

    def attach(self, host: str, vdi: str, mode: str) -> int:
        """A new datapath, or the ``INTERNAL_ERROR`` of an illegal superstate change."""
        with self.lock:
            paths = self.held.setdefault((host, vdi), {})
            before = "RW" if "RW" in paths.values() else "RO"
            if paths and before == "RO" and mode == "RW":
                self.refused += 1
                raise XapiError(
                    "INTERNAL_ERROR",
                    "Storage_interface.Storage_error(Illegal_transition("
                    "Activated(RO), Activated(RW)))",
                )
            dp = next(self._ids)
            paths[dp] = mode
            return dp

    def release(self, host: str, vdi: str, dp: int, *, linger: bool = False) -> None:
        """Detach ``dp``, after ``linger_s`` when its export was dropped mid-stream."""
        if linger and self.linger_s > 0:
            timer = threading.Timer(self.linger_s, self.release, (host, vdi, dp))
            timer.daemon = True
            timer.start()
            return
        with self.lock:
            paths = self.held.get((host, vdi), {})
            paths.pop(dp, None)
            if not paths:
                self.held.pop((host, vdi), None)

    def snapshot(self) -> dict[str, object]:
        with self.lock:
            held = {f"{h} {v}": sorted(p.values()) for (h, v), p in self.held.items()}
            return {"held": held, "refused": self.refused, "linger_s": self.linger_s}


def error_page(exc: Exception) -> bytes:
    """The page Http_svr writes after a handler raised, whatever it already sent
    (``http_svr.ml`` l.539-565 -> ``response_internal_error`` l.200-217 ->
    ``response_error_html`` l.145-155): a whole HTTP/1.1 500 response, in the body of the
    200 (xen-api#4603). The exception text follows the fixed text, HTML-escaped."""
    if isinstance(exc, XapiError):
        code, *params = exc.description
        text = f"Server_error({code}, [ {'; '.join(params)} ])"
    else:
        text = repr(exc)
    body = (
        "<html><body><h1>HTTP 500 internal server error</h1>An unexpected error occurred;"
        " please wait a while and try again. If the problem persists, please contact your"
        " support representative.<h1> Additional information </h1>"
        f"{escape(text)}</body></html>"
    ).encode()
    head = (
        "HTTP/1.1 500 Internal Error\r\n"
        f"content-length: {len(body)}\r\n"
        "content-type: text/html\r\n"
        "connection: close\r\n"
        "cache-control: no-cache, no-store\r\n\r\n"
    ).encode()
    return head + body
