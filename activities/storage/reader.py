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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from ..errors import ImageUnreadable, SourceGone, UnsupportedImage


@dataclass(frozen=True)
class DataExtent:
    """Guest range [start, start+length) whose bytes are at ``host_offset`` in ``path``."""

    start: int
    length: int
    path: str
    host_offset: int


class ZeroExtent(DataExtent):
    """A delta's range that changed to zeros: carried (and restored) as zeros, never read."""


class SnapshotReader(Protocol):
    virtual_size: int

    def data_extents(self) -> Iterable[DataExtent]:
        """Ranges that hold data, sorted by start; everything else reads as zeros. May be
        a lazy iterator (consumed once, in order), so that memory stays flat."""
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


@dataclass(frozen=True)
class ImageLayer:
    """One file of a disk chain, with the format snapferry *knows* it has."""

    path: str
    format: str
    virtual_size: int


def image_info(path: str, fmt: str) -> dict:
    """``qemu-img info`` of one image, read as ``fmt`` (never probed: a guest that writes a
    qcow2 header into its raw disk must not make us read it as qcow2), shared-lock safe for
    images a running VM holds. It opens only this file: qemu-img info uses
    ``BDRV_O_NO_BACKING``."""
    return json.loads(run_qemu_img("info", "-U", "-f", fmt, "--output=json", path))


def image_chain(path: str, fmt: str) -> list[ImageLayer]:
    """The chain from ``path`` (format ``fmt``, known from libvirt's ``<driver type>`` or
    from the chain snapferry built) down to its root, one file at a time.

    Each backing file is opened with the format its child *records*. A backing file with
    no recorded format is refused before it is ever opened: letting qemu-img probe it is
    the classic way for a guest to make the host read another tenant's file."""
    layers: list[ImageLayer] = []
    current, current_fmt = path, fmt
    while True:
        info = image_info(current, current_fmt)
        layers.append(ImageLayer(current, current_fmt, int(info["virtual-size"])))
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        if not backing:
            return layers
        backing_fmt = info.get("backing-filename-format")
        if not backing_fmt:
            raise UnsupportedImage(
                f"{current}: its backing file {backing} has no recorded backing format;"
                " refusing to let qemu-img guess it (record it with"
                " `qemu-img rebase -u -b <file> -F <format>` if the chain is trusted)"
            )
        if len(layers) > 256:
            raise UnsupportedImage(f"{path}: backing chain deeper than 256 (a loop?)")
        current, current_fmt = backing, backing_fmt


class QemuImageReader:
    """Read a (possibly backed) image through ``qemu-img map``'s host offsets.

    ``qemu-img map --output=json`` reports, for every guest range, whether it holds data or
    zeros, at which depth of the backing chain, and at which host offset of that file. With
    the chain's file names (from :func:`image_chain`, every format known, none probed) that
    is enough to read the guest view with plain ``pread``, with no qcow2 parser and no NBD
    server. Compressed or encrypted clusters have no host offset; they are refused, not
    silently misread.
    """

    def __init__(self, path: str, fmt: str, *, changed_above: str | None = None) -> None:
        """``changed_above``: read a delta, only the ranges written in the layers above
        that file of the chain (``path`` down to it, itself included), zeros included (a
        write of zeros is a change too); see :meth:`_map_window`."""
        layers = image_chain(path, fmt)
        self.path = path
        self.format = fmt
        self.chain = [layer.path for layer in layers]
        self.virtual_size = layers[0].virtual_size
        self._files: dict[str, int] = {}
        self.changed_depth: int | None = None
        if changed_above is not None:
            if changed_above not in self.chain:
                raise SourceGone(
                    f"{path}: the delta's base layer {changed_above} is no longer in its"
                    " backing chain (merged away or removed): what changed since cannot be"
                    " told from the chain"
                )
            self.changed_depth = self.chain.index(changed_above) + 1

    def data_extents(self, start: int = 0) -> Iterator[DataExtent]:
        """The data extents from ``start`` on, mapped window by window (``qemu-img map
        --start-offset --max-length``), so that neither the map's output nor the extent
        list of a large, fragmented image is ever held whole. The window adapts to the
        image's fragmentation: it grows while windows come back with few ranges and
        shrinks when one comes back with many. The first window is mapped at once, so an
        image that cannot be mapped fails here, before any copying."""
        first = self._map_window(start, self._window)
        return self._extents_after(start, first)

    _window = 1 << 30  # 1 GiB to begin with
    _MAX_WINDOW = 1 << 40
    _TARGET_RANGES = 4096

    def _extents_after(
        self, start: int, first: tuple[list[DataExtent], int, int]
    ) -> Iterator[DataExtent]:
        extents, end, ranges = first
        window = self._window
        while True:
            yield from extents
            if end >= self.virtual_size:
                return
            if ranges < self._TARGET_RANGES // 4:
                window = min(window * 4, self._MAX_WINDOW)
            elif ranges > self._TARGET_RANGES:
                window = max(window // 4, 64 << 20)
            extents, end, ranges = self._map_window(end, window)

    def _map_window(self, offset: int, length: int) -> tuple[list[DataExtent], int, int]:
        """One ``qemu-img map`` window: its data extents, where it ended, how many ranges."""
        length = min(length, self.virtual_size - offset)
        if length <= 0:
            return [], self.virtual_size, 0
        mapping = json.loads(
            run_qemu_img(
                "map",
                "-U",
                "-f",
                self.format,
                f"--start-offset={offset}",
                f"--max-length={length}",
                "--output=json",
                self.path,
            )
        )
        extents: list[DataExtent] = []
        end = offset
        for e in mapping:
            end = max(end, int(e["start"]) + int(e["length"]))
            depth = int(e.get("depth", 0))
            if self.changed_depth is not None:
                # A delta: qemu-img map names the chain depth each range is read from
                # (docs/tools/qemu-img.rst, "map"); a range from below the boundary is
                # unchanged since the base, one from above it changed, even to zeros
                # (a zero cluster, or a discard, at that depth).
                if depth >= self.changed_depth:
                    continue
                if not e.get("data") or e.get("zero"):
                    extents.append(ZeroExtent(int(e["start"]), int(e["length"]), "", 0))
                    continue
            elif not e.get("data") or e.get("zero"):
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
                    path=self.chain[depth],
                    host_offset=int(e["offset"]),
                )
            )
        if end <= offset:  # qemu-img said nothing about the window: never loop on it
            raise ImageUnreadable(f"{self.path}: qemu-img map returned nothing at {offset}")
        return extents, end, len(mapping)

    def read_range(self, extent: DataExtent, guest_offset: int, view: memoryview) -> None:
        if isinstance(extent, ZeroExtent):
            view[:] = bytes(len(view))
            return
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
