"""A backup in the repository: a complete index of its disk, written and read.

A backup's index is one 32-byte segment ID per 4 MiB of the disk (``<snapshot>.segments``:
16 MiB for 2 TiB); a segment is a blob listing its 64 chunk IDs; ``ZERO_ID`` stands for
zeros at both levels. Every backup is whole: an incremental starts from its parent's index,
keeps the IDs of segments that did not change and writes new segments for those that did,
so a backup restores, verifies and deletes on its own, whatever happens to its parent.

Why 64 KiB chunks in 4 MiB segments: the incrementals know changes at 64 KiB (qemu-img map,
XAPI deltas, vSphere CBT), so a 1 % change written as scattered 64 KiB writes stores about
1 % of new chunks, plus a 2 KiB segment blob for each 4 MiB touched; with 4 MiB chunks, as
Proxmox Backup Server uses, the same change stores about half the disk. The two levels keep
the index of a backup small (1/2048 of the disk) and unchanged segments shared.

A writer's checkpoint makes everything it wrote durable (packs, index, the segments done so
far); after a crash it resumes at the first segment not done, and the chunks it writes again
are found in the index, so they cost a lookup, not a second copy.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import mmap
import os
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from ...errors import BackupCorrupt, InvalidInput
from ..files import FILE_MODE, atomic_write, fsync_dir, fsync_file, make_dirs
from .blobs import ID_BYTES, ZERO_ID
from .packs import CHUNK, SEGMENT, BlobLocation, PackWriter

if TYPE_CHECKING:
    from .repository import Repository

SEGMENTS_MAGIC = b"SFSEG001"


class BackupManifest(BaseModel):
    snapshot_id: str
    vm: str
    disk: str
    virtual_size: int
    chunk_bytes: int
    segment_chunks: int
    segments: int
    key_fingerprint: str | None
    parent: str | None = None
    created: datetime
    data_bytes: int = 0  # bytes of non-zero chunks: what a restore writes
    new_bytes: int = 0  # stored bytes this backup added to the repository
    index_sha256: str = ""
    # Where the backup came from, for the next backup's plan (BackupHistoryEntry) and for
    # operators: the take's image on primary, incrementals since the last full backup.
    hypervisor: str = ""
    source: str = ""
    source_format: str = ""
    depth: int = 0
    change_id: str | None = None
    full_reason: str | None = None

    mac: str = ""  # encrypted repositories: HMAC of every other field (manifest_mac)

    @property
    def checksum(self) -> str:
        """What identifies the backup's content: the SHA-256 of its index, whose segment IDs
        name (hash, or keyed hash) every byte of the disk."""
        return f"sfrepo1:{self.index_sha256}"


@dataclass(frozen=True)
class PreparedChunk:
    blob_id: bytes
    found: BlobLocation | None  # where the repository already had it, when prepared
    stored: bytes | None  # its encoded form, when it was not found
    plain: bytes


class BackupWriter:
    """Writes one backup: ``write`` its changed chunks in increasing offset order, then
    ``commit``. Anything not written is the parent's (or zeros, without a parent)."""

    def __init__(
        self,
        repo: Repository,
        *,
        snapshot_id: str,
        vm: str,
        disk: str,
        virtual_size: int,
        parent: BackupManifest | None = None,
        resume: bool = False,
        meta: dict[str, object] | None = None,
        on_pack: Callable[[list[BlobLocation]], None] | None = None,
    ) -> None:
        """``meta``: more manifest fields (hypervisor, source, depth...). ``on_pack(blobs)``
        is called with what each published pack holds, once it is durable (a verify reads
        it back from the medium behind the copy)."""
        if virtual_size <= 0:
            raise InvalidInput(f"virtual size {virtual_size} is not positive")
        self.repo = repo
        self.cfg = repo.config
        self.chunk = self.cfg.chunk_bytes
        self.seg_bytes = self.chunk * self.cfg.segment_chunks
        self.vm, self.disk, self.snapshot_id = vm, disk, snapshot_id
        self.virtual_size = virtual_size
        self.total_segments = -(-virtual_size // self.seg_bytes)
        self.parent = BackupReader(repo, parent) if parent is not None else None
        self.meta = dict(meta or {})
        self._zeros = bytes(self.chunk)
        self.on_pack = on_pack
        directory = repo.backup_dir(vm, disk)
        make_dirs(directory)
        self.final = directory / f"{snapshot_id}.segments"
        self.partial = directory / f"{snapshot_id}.segments.partial"
        self.writer_file = repo.root / "writers" / f"{snapshot_id}.{uuid.uuid4().hex}.json"
        make_dirs(self.writer_file.parent)
        atomic_write(
            self.writer_file, json.dumps({"snapshot": snapshot_id, "started": time.time()})
        )
        # How many segments the last checkpoint made durable: segment IDs appended after
        # it may name blobs of a pack that was never published, so they are not trusted.
        self.checkpoint_file = directory / f"{snapshot_id}.segments.checkpoint"
        if not resume:
            self.checkpoint_file.unlink(missing_ok=True)
        if parent is not None:
            self._link_parent(repo, parent)
        flags = os.O_RDWR | os.O_CREAT | (0 if resume else os.O_TRUNC)
        self.fd = os.open(self.partial, flags, FILE_MODE)
        done = max(0, os.fstat(self.fd).st_size - len(SEGMENTS_MAGIC)) // ID_BYTES
        self.segments_done = min(done, self.total_segments, self._checkpointed())
        self.touched: set[str] = set()
        # The packs the trusted segments use, which the copy reads back from the medium
        # (an earlier attempt's were sealed, maybe never read back).
        self.resumed_packs: set[str] = set()
        if self.segments_done:
            self.segments_done = self._still_whole(self.segments_done)
        os.ftruncate(self.fd, len(SEGMENTS_MAGIC) + self.segments_done * ID_BYTES)
        os.pwrite(self.fd, SEGMENTS_MAGIC, 0)
        os.lseek(self.fd, 0, os.SEEK_END)
        self.pack: PackWriter | None = None
        self._sealer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="repo-seal")
        self._sealing: list[Future[list[BlobLocation]]] = []
        self.published: list[BlobLocation] = []
        self.session: set[bytes] = set()  # blobs stored or confirmed in this session
        self.cur_seg = -1
        self.cur_ids: list[bytes] = []
        self.new_bytes = 0

    def _link_parent(self, repo: Repository, parent: BackupManifest) -> None:
        """Hard-link the parent's index beside the writer file for the writer's life: gc
        marks through it, so a delete of the parent meanwhile frees nothing this backup
        will still inherit (as Proxmox Backup Server locks a backup's base snapshot)."""
        source = repo.backup_dir(parent.vm, parent.disk) / f"{parent.snapshot_id}.segments"
        self.parent_link = self.writer_file.with_suffix(".parent.segments")
        try:
            os.link(source, self.parent_link)
        except FileNotFoundError:
            self.writer_file.unlink(missing_ok=True)
            raise BackupCorrupt(
                f"the parent backup {parent.snapshot_id} was deleted: back up in full"
            ) from None

    def _still_whole(self, trusted: int) -> int:
        """How many of the trusted segments still find every blob they name (a resume may
        come long after its attempt; each blob's pack is touched for gc): the resume starts
        at the first segment that does not."""
        with open(self.partial, "rb") as f:
            f.seek(len(SEGMENTS_MAGIC))
            raw = f.read(trusted * ID_BYTES)
        for seg in range(trusted):
            seg_id = raw[seg * ID_BYTES : (seg + 1) * ID_BYTES]
            if seg_id == ZERO_ID:
                continue
            ids = [seg_id]
            try:
                data = self.repo.read_blob(seg_id, where=f"segment {seg} of a resumed backup")
            except BackupCorrupt:
                return seg
            ids += [data[i : i + ID_BYTES] for i in range(0, len(data), ID_BYTES)]
            for blob_id in ids:
                if blob_id == ZERO_ID:
                    continue
                found = self.repo.find(blob_id)
                if found is None or not self.repo.touch_pack(found.pack, self.touched):
                    return seg
                self.resumed_packs.add(found.pack)
        return trusted

    def _checkpointed(self) -> int:
        try:
            return int(json.loads(self.checkpoint_file.read_text())["segments"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return 0

    @property
    def resume_offset(self) -> int:
        """Where a resumed copy starts again: everything before it is durable."""
        return self.segments_done * self.seg_bytes

    # -- blobs ------------------------------------------------------------------------
    def _known(self, blob_id: bytes) -> bool:
        if blob_id in self.session:
            return True
        found = self.repo.find(blob_id)
        if found is None or not self.repo.touch_pack(found.pack, self.touched):
            return False
        self.session.add(blob_id)
        return True

    def _store(self, kind: int, data: bytes) -> bytes:
        blob_id = self.repo.codec.blob_id(data)
        if self._known(blob_id):
            return blob_id
        self._add(blob_id, kind, self.repo.codec.encode(blob_id, data))
        return blob_id

    def _add(self, blob_id: bytes, kind: int, stored: bytes) -> None:
        if self.pack is None:
            self.pack = PackWriter(self.repo.root, self.repo.codec)
        self.pack.add(blob_id, kind, stored)
        self.new_bytes += len(stored)
        self.session.add(blob_id)
        if self.pack.full:
            self._publish_pack()

    def _publish_pack(self) -> None:
        """Seal the open pack (fsync, rename) on the sealing thread, so that the copy goes
        on meanwhile; a checkpoint waits for every seal before it names the pack durable."""
        if self.pack is not None:
            self._sealing.append(self._sealer.submit(self._seal, self.pack))
            self.pack = None

    def _seal(self, pack: PackWriter) -> list[BlobLocation]:
        blobs = pack.finish()
        if self.on_pack is not None:
            self.on_pack(blobs)
        return blobs

    def _sealed(self) -> None:
        try:
            for fut in self._sealing:
                self.published += fut.result()
        finally:
            self._sealing.clear()

    # -- segments -------------------------------------------------------------------
    def _chunks_in(self, seg: int) -> int:
        return min(
            self.cfg.segment_chunks, -(-(self.virtual_size - seg * self.seg_bytes) // self.chunk)
        )

    def _open_segment(self, seg: int) -> None:
        n = self._chunks_in(seg)
        ids = self.parent.chunk_ids(seg) if self.parent is not None else []
        self.cur_ids = (ids + [ZERO_ID] * n)[:n]
        self.cur_seg = seg
        if self.parent is not None and self.parent.manifest.virtual_size != self.virtual_size:
            self._resize_last_parent_chunk(seg)

    def _resize_last_parent_chunk(self, seg: int) -> None:
        """After a resize, the parent's last chunk (short when its size was not a multiple
        of a chunk) is this disk's chunk of another length: zeros past the old end after a
        grow, cut at the new end after a shrink. It is stored at its new length."""
        assert self.parent is not None
        old_size = self.parent.manifest.virtual_size
        for j, blob_id in enumerate(self.cur_ids):
            offset = seg * self.seg_bytes + j * self.chunk
            new_len = min(self.chunk, self.virtual_size - offset)
            old_len = min(self.chunk, old_size - offset)
            if blob_id == ZERO_ID or old_len == new_len or old_len <= 0:
                continue
            data = self.repo.read_blob(blob_id, where=f"the parent backup at offset {offset}")
            resized = (data + bytes(new_len))[:new_len]
            zero = resized == bytes(new_len)
            self.cur_ids[j] = ZERO_ID if zero else self._store(CHUNK, resized)

    def _close_segment(self) -> None:
        ids = self.cur_ids
        seg_id = ZERO_ID if all(i == ZERO_ID for i in ids) else self._store(SEGMENT, b"".join(ids))
        self._append(seg_id)

    def _append(self, seg_id: bytes) -> None:
        os.write(self.fd, seg_id)
        self.segments_done += 1
        self.cur_seg = -1

    def _advance_to(self, seg: int) -> None:
        """Close the open segment, and carry every segment before ``seg`` from the parent."""
        if seg < self.segments_done or (self.cur_seg >= 0 and seg < self.cur_seg):
            raise InvalidInput(f"writes must go forward: segment {seg} is already done")
        if self.cur_seg >= 0 and seg > self.cur_seg:
            self._close_segment()
        while self.segments_done < seg and self.cur_seg < 0:
            s = self.segments_done
            inherited = (
                self.parent.inherit(s, self._chunks_in(s), self.virtual_size)
                if self.parent
                else ZERO_ID
            )
            if inherited is None:  # the parent's segment differs in length: rebuild it
                self._open_segment(s)
                self._close_segment()
            else:
                self._append(inherited)
        if self.cur_seg < 0 and seg < self.total_segments:
            self._open_segment(seg)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Chunks from ``offset`` (chunk-aligned); all-zero chunks are recorded as zeros."""
        if offset % self.chunk or offset < 0 or offset + len(data) > self.virtual_size:
            raise InvalidInput(f"write at {offset} of {len(data)} bytes is not chunk-aligned")
        if len(data) % self.chunk and offset + len(data) != self.virtual_size:
            raise InvalidInput(f"write at {offset}: only the disk's last chunk may be short")
        view = memoryview(data)
        zeros = bytes(self.chunk)
        for pos in range(0, len(view), self.chunk):
            piece = bytes(view[pos : pos + self.chunk])
            c = (offset + pos) // self.chunk
            self._advance_to(c // self.cfg.segment_chunks)
            zero = piece == zeros[: len(piece)]
            self.cur_ids[c % self.cfg.segment_chunks] = (
                ZERO_ID if zero else self._store(CHUNK, piece)
            )

    def put(self, offset: int, chunk: PreparedChunk) -> None:
        """One chunk prepared on a copy thread (:meth:`prepare`), at ``offset``, in
        increasing order. A chunk found then but gone now (gc) is encoded here."""
        if offset % self.chunk or not 0 <= offset < self.virtual_size:
            raise InvalidInput(f"chunk at {offset} is not chunk-aligned within the disk")
        c = offset // self.chunk
        self._advance_to(c // self.cfg.segment_chunks)
        blob_id = chunk.blob_id
        if blob_id != ZERO_ID and blob_id not in self.session:
            if chunk.found is not None and self.repo.touch_pack(chunk.found.pack, self.touched):
                self.session.add(blob_id)
            else:
                stored = chunk.stored or self.repo.codec.encode(blob_id, chunk.plain)
                self._add(blob_id, CHUNK, stored)
        self.cur_ids[c % self.cfg.segment_chunks] = blob_id

    def prepare(self, plain: bytes) -> PreparedChunk:
        """Hash a chunk, look it up, and encode it if the repository lacks it: the costly
        part of :meth:`write`, safe on any thread (zstd and AES-GCM contexts are per thread,
        the index is read-only here), so the copy spreads it over the cores."""
        zeros = self._zeros if len(plain) == self.chunk else bytes(len(plain))
        if plain != zeros:
            blob_id = self.repo.codec.blob_id(plain)
            found = self.repo.find(blob_id)
            stored = None if found is not None else self.repo.codec.encode(blob_id, plain)
            return PreparedChunk(blob_id, found, stored, plain)
        return PreparedChunk(ZERO_ID, None, None, b"")

    def checkpoint(self) -> int:
        """Make what is written durable; returns ``resume_offset``."""
        self._publish_pack()
        self._sealed()
        self.repo.index.add(self.published)
        self.published = []
        # What this session stored is in the index now: the set stays bounded by what one
        # checkpoint interval writes, whatever the disk's size.
        self.session.clear()
        os.fsync(self.fd)
        atomic_write(self.checkpoint_file, json.dumps({"segments": self.segments_done}))
        os.utime(self.writer_file)  # alive: gc keeps what this writer references
        # One index file per checkpoint: merged once there are many, so that a long backup
        # does not make every lookup bisect hundreds of files.
        self.repo.index.maybe_compact()
        return self.resume_offset

    def finish_data(self) -> None:
        """Close the last segment and make everything durable, before the manifest."""
        self._advance_to(self.total_segments)
        self.checkpoint()

    def commit(self) -> BackupManifest:
        self.finish_data()
        self._sealer.shutdown()
        os.close(self.fd)
        self.fd = -1
        sha = _file_sha256(self.partial)
        os.replace(self.partial, self.final)
        self.checkpoint_file.unlink(missing_ok=True)
        fsync_dir(self.final.parent)
        manifest = BackupManifest(
            snapshot_id=self.snapshot_id,
            vm=self.vm,
            disk=self.disk,
            virtual_size=self.virtual_size,
            chunk_bytes=self.chunk,
            segment_chunks=self.cfg.segment_chunks,
            segments=self.total_segments,
            key_fingerprint=self.cfg.key_fingerprint,
            parent=self.parent.manifest.snapshot_id if self.parent else None,
            created=datetime.now(UTC),
            new_bytes=self.new_bytes,
            index_sha256=sha,
            **self.meta,  # type: ignore[arg-type]
        )
        manifest.mac = manifest_mac(self.repo, manifest)
        manifest.data_bytes = BackupReader(self.repo, manifest).data_bytes()  # not signed
        atomic_write(self.final.with_suffix(".json"), manifest.model_dump_json(indent=2))
        self._unlink_writer()
        self.repo.index.maybe_compact()
        return manifest

    def abort(self) -> None:
        """Stop without a backup (the partial index stays for a resume; gc frees the rest)."""
        self._sealer.shutdown(wait=True)  # packs being sealed are whole, or left in tmp/
        if self.pack is not None:
            self.pack.abort()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._unlink_writer()

    def _unlink_writer(self) -> None:
        self.writer_file.unlink(missing_ok=True)
        self.writer_file.with_suffix(".parent.segments").unlink(missing_ok=True)


def manifest_mac(repo: Repository, manifest: BackupManifest) -> str:
    """HMAC-SHA256, under a key derived for this alone, of the manifest's every field but
    the MAC: with the index's SHA-256 among them, it authenticates the whole index, so
    no one without the key can swap segments or edit a manifest (as PBS signs its
    manifests). Empty for an unencrypted repository, which has no secret to sign with."""
    key = repo.codec.key
    if key is None or not key.manifest_key:
        return ""
    body = manifest.model_dump_json(exclude={"mac", "data_bytes"}).encode()
    return hmac.new(key.manifest_key, body, hashlib.sha256).hexdigest()


def _file_sha256(path: os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class BackupReader:
    """Reads a committed backup: its segments, chunks and bytes, each checked on the way."""

    def __init__(self, repo: Repository, manifest: BackupManifest) -> None:
        self.repo = repo
        self.manifest = manifest
        self.chunk = manifest.chunk_bytes
        self.seg_bytes = manifest.chunk_bytes * manifest.segment_chunks
        path = repo.backup_dir(manifest.vm, manifest.disk) / f"{manifest.snapshot_id}.segments"
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except FileNotFoundError:
            raise BackupCorrupt(
                f"backup {manifest.snapshot_id}: its index {path} is missing"
            ) from None
        if (
            bytes(self.map[: len(SEGMENTS_MAGIC)]) != SEGMENTS_MAGIC
            or len(self.map) != len(SEGMENTS_MAGIC) + manifest.segments * ID_BYTES
        ):
            raise BackupCorrupt(f"backup {manifest.snapshot_id}: its index {path} is damaged")
        if manifest.index_sha256 and (
            hashlib.sha256(self.map).hexdigest() != manifest.index_sha256
        ):
            raise BackupCorrupt(
                f"backup {manifest.snapshot_id}: its index {path} does not match its manifest"
            )
        expected = manifest_mac(repo, manifest)
        if expected and not hmac.compare_digest(expected, manifest.mac):
            raise BackupCorrupt(
                f"backup {manifest.snapshot_id}: its manifest does not authenticate with this"
                " key (edited, or another repository's)"
            )
        self._cache: tuple[int, list[bytes]] = (-1, [])

    def segment_id(self, seg: int) -> bytes:
        start = len(SEGMENTS_MAGIC) + seg * ID_BYTES
        return bytes(self.map[start : start + ID_BYTES])

    def chunks_in(self, seg: int) -> int:
        left = self.manifest.virtual_size - seg * self.seg_bytes
        return min(self.manifest.segment_chunks, -(-left // self.chunk))

    def chunk_ids(self, seg: int) -> list[bytes]:
        if seg >= self.manifest.segments:
            return []
        if self._cache[0] == seg:
            return list(self._cache[1])
        seg_id = self.segment_id(seg)
        if seg_id == ZERO_ID:
            ids = [ZERO_ID] * self.chunks_in(seg)
        else:
            raw = self.repo.read_blob(seg_id, where=self._where(seg * self.seg_bytes))
            ids = [raw[i : i + ID_BYTES] for i in range(0, len(raw), ID_BYTES)]
            if len(ids) != self.chunks_in(seg):
                raise BackupCorrupt(f"{self._where(seg * self.seg_bytes)}: segment is malformed")
        self._cache = (seg, ids)
        return list(ids)

    def inherit(self, seg: int, chunks: int, size: int) -> bytes | None:
        """The parent's segment ID if it can be kept as is, else None. A segment that holds
        the parent's end is kept only when the disk has the parent's size: its last chunk
        may be short, and another size needs another length of it."""
        if seg >= self.manifest.segments:
            return ZERO_ID
        if seg == self.manifest.segments - 1 and size != self.manifest.virtual_size:
            return None
        return self.segment_id(seg) if self.chunks_in(seg) == chunks else None

    def _where(self, offset: int) -> str:
        m = self.manifest
        return f"backup {m.snapshot_id} of {m.vm}/{m.disk} at offset {offset}"

    def chunks(self, start: int = 0) -> Iterator[tuple[int, bytes]]:
        """(offset, chunk ID) of every non-zero chunk from ``start``, in order."""
        for seg in range(start // self.seg_bytes, self.manifest.segments):
            if self.segment_id(seg) == ZERO_ID:
                continue
            for j, cid in enumerate(self.chunk_ids(seg)):
                offset = seg * self.seg_bytes + j * self.chunk
                if cid != ZERO_ID and offset >= start:
                    yield offset, cid

    def read_chunk(self, offset: int, chunk_id: bytes) -> bytes:
        data = self.repo.read_blob(chunk_id, where=self._where(offset))
        want = min(self.chunk, self.manifest.virtual_size - offset)
        if len(data) != want:
            raise BackupCorrupt(f"{self._where(offset)}: chunk is {len(data)} bytes, not {want}")
        return data

    def read(self, offset: int, length: int) -> bytes:
        """Any range of the disk (zeros where it holds none): an NBD export reads this."""
        end = min(offset + length, self.manifest.virtual_size)
        out = bytearray()
        pos = offset
        while pos < end:
            c = pos // self.chunk
            seg, j = divmod(c, self.manifest.segment_chunks)
            cid = self.chunk_ids(seg)[j]
            base = c * self.chunk
            take = min(end, base + self.chunk) - pos
            if cid == ZERO_ID:
                out += bytes(take)
            else:
                data = self.read_chunk(base, cid)
                out += data[pos - base : pos - base + take]
            pos += take
        return bytes(out)

    def data_bytes(self) -> int:
        return sum(min(self.chunk, self.manifest.virtual_size - o) for o, _ in self.chunks())

    def restore_to(
        self, path: str | Path, *, progress: Callable[[int], None] | None = None
    ) -> None:
        """A sparse raw image of the disk at ``path`` (only non-zero chunks written)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            os.ftruncate(fd, self.manifest.virtual_size)
            for offset, cid in self.chunks():
                os.pwrite(fd, self.read_chunk(offset, cid), offset)
                if progress is not None:
                    progress(offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_file(path)
