"""Readers: what a hypervisor driver hands the copy engine.

A reader exposes the guest-visible bytes of one snapshot and, crucially, which ranges hold
data, so that the engine never reads or writes holes and zero clusters. Vendors implement
:class:`SnapshotReader`; :class:`QemuImageReader` covers any image ``qemu-img`` understands
(qcow2 chains, raw), which is every KVM snapshot.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from typing import Protocol

from ..errors import ImageUnreadable, UnsupportedImage


@dataclass(frozen=True)
class DataExtent:
    """Guest range [start, start+length) whose bytes are at ``host_offset`` in ``path``."""

    start: int
    length: int
    path: str
    host_offset: int


class SnapshotReader(Protocol):
    virtual_size: int

    def data_extents(self) -> list[DataExtent]:
        """Ranges that hold data, sorted by start; everything else reads as zeros."""
        ...

    def read_range(self, extent: DataExtent, guest_offset: int, view: memoryview) -> None:
        """Fill ``view`` with guest bytes from ``guest_offset``, which lies inside ``extent``."""
        ...

    def close(self) -> None: ...


def run_qemu_img(*args: str) -> str:
    """Run qemu-img; a failure (I/O error, a file not there yet) is retryable."""
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageUnreadable(f"qemu-img {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def image_info(path: str) -> dict:
    """``qemu-img info`` of one image, shared-lock safe for images a running VM holds."""
    return json.loads(run_qemu_img("info", "-U", "--output=json", path))


class QemuImageReader:
    """Read a (possibly backed) image through ``qemu-img map``'s host offsets.

    ``qemu-img map --output=json`` reports, for every guest range, whether it holds data or
    zeros, at which depth of the backing chain, and at which host offset of that file. With
    the chain's file names from ``qemu-img info --backing-chain`` that is enough to read the
    guest view with plain ``pread``, with no qcow2 parser and no NBD server. Compressed or
    encrypted clusters have no host offset; they are refused, not silently misread.
    """

    def __init__(self, path: str) -> None:
        chain = json.loads(run_qemu_img("info", "-U", "--backing-chain", "--output=json", path))
        self.path = path
        self.chain = [entry["filename"] for entry in chain]
        self.virtual_size = int(chain[0]["virtual-size"])
        self._files: dict[str, int] = {}

    def data_extents(self) -> list[DataExtent]:
        mapping = json.loads(run_qemu_img("map", "-U", "--output=json", self.path))
        extents: list[DataExtent] = []
        for e in mapping:
            if not e.get("data") or e.get("zero"):
                continue
            if "offset" not in e:
                raise UnsupportedImage(
                    f"{self.path}: range {e['start']}+{e['length']} has no host offset"
                    " (compressed or encrypted clusters are not supported)"
                )
            extents.append(
                DataExtent(
                    start=int(e["start"]),
                    length=int(e["length"]),
                    path=self.chain[int(e.get("depth", 0))],
                    host_offset=int(e["offset"]),
                )
            )
        return extents

    def read_range(self, extent: DataExtent, guest_offset: int, view: memoryview) -> None:
        if extent.path not in self._files:
            self._files[extent.path] = os.open(extent.path, os.O_RDONLY)
        fd = self._files[extent.path]
        pos = extent.host_offset + (guest_offset - extent.start)
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], pos + done)
            if n == 0:
                raise UnsupportedImage(f"{extent.path}: unexpected end of file at {pos + done}")
            done += n

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
