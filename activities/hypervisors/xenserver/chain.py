"""The VHD chain of a VDI, read before a snapshot: SM refuses to snapshot one that is
already ``MAX_CHAIN_SIZE`` VHDs deep.

On a VHD SR every snapshot freezes the disk's leaf VHD as a read-only parent, introduced
as an unmanaged VDI ("base copy"); each VDI names its parent's uuid in
``sm_config['vhd-parent']`` (SM ``FileSR._snapshot``, ``LVHDSR``). SM's ``_snapshot``
refuses a VDI whose chain is 30 VHDs deep or more (``vhdutil.MAX_CHAIN_SIZE``,
``SnapshotChainTooLong``: ``SR_BACKEND_FAILURE_109``). The SR's garbage collector
shortens a chain by coalescing a base copy whose parent has no other child
(``cleanup.py`` ``isCoalesceable``); one held by a snapshot (two children) stays.

Xen Orchestra walks the same ``vhd-parent`` links before each backup snapshot and
counts the unmanaged VDIs with exactly one unmanaged child as not yet coalesced
(``@xen-orchestra/xapi/vm.mjs`` ``_assertHealthyVdiChain``).
"""

from __future__ import annotations

from typing import Any

from ...errors import ChainBusy, InvalidInput, SourceGone
from .core import XenCore

MAX_CHAIN_SIZE = 30  # SM libs/sm/vhdutil.py: VHDs in a chain, the VDI's own included


class ChainCheck(XenCore):
    def _chain(self, vdi: str) -> list[dict[str, Any]]:
        """The VDI's record, then its parents' by ``sm_config['vhd-parent']``, leaf first.
        A parent XAPI does not know (yet: an SR scan pending) ends the walk."""
        chain = [self._api("VDI.get_record", vdi)]
        while len(chain) <= MAX_CHAIN_SIZE and (
            parent := (chain[-1].get("sm_config") or {}).get("vhd-parent")
        ):
            try:
                chain.append(self._api("VDI.get_record", self._api("VDI.get_by_uuid", parent)))
            except SourceGone:
                break
        return chain

    def _assert_chain_room(self, vdi: str, what: str) -> None:
        """Refuse, before XAPI is asked, a snapshot SM would refuse: the chain is at the
        limit. When the SR's garbage collector can shorten it (base copies with a single
        child), that is a wait (``ChainBusy``, retried); when it cannot (every base copy
        is held by a snapshot), no wait helps (``InvalidInput``)."""
        chain = self._chain(vdi)
        if len(chain) < MAX_CHAIN_SIZE:
            return
        uuid = chain[0]["uuid"]
        deep = f"the VHD chain of VDI {uuid} is {len(chain)} VHDs deep"
        pending = self._uncoalesced(chain)
        if pending:
            raise ChainBusy(
                f"{what}: {deep}; SM's limit is {MAX_CHAIN_SIZE} (SR_BACKEND_FAILURE_109)."
                f" {pending} of its base copies have a single child and wait for the SR's"
                " garbage collector to coalesce them (a stalled collector: a full LVHD SR,"
                " a failed coalesce in /var/log/SMlog); retried until it has"
            )
        held = len(self._api("VDI.get_snapshots", vdi))
        raise InvalidInput(
            f"{what}: {deep} and SM's limit is {MAX_CHAIN_SIZE} (SR_BACKEND_FAILURE_109);"
            f" {held} snapshots of the disk hold its base copies, so the SR's garbage"
            " collector cannot shorten it. Delete snapshots of this disk (other tools'"
            " included) and let the SR coalesce, or copy the VDI (VDI.copy writes a"
            " single VHD)"
        )

    def _uncoalesced(self, chain: list[dict[str, Any]]) -> int:
        """How many base copies of the chain the GC would coalesce: unmanaged, with a
        parent, and the only child of that parent. Children are counted over the SR's
        VDIs, by their ``vhd-parent``."""
        children: dict[str, int] = {}
        for one in self._api("SR.get_VDIs", chain[0]["SR"]):
            try:
                parent = (self._api("VDI.get_sm_config", one) or {}).get("vhd-parent")
            except SourceGone:
                continue
            if parent:
                children[parent] = children.get(parent, 0) + 1
        return sum(
            1
            for child, parent in zip(chain[1:], chain[2:], strict=False)
            if not child.get("managed", True) and children.get(parent["uuid"]) == 1
        )
