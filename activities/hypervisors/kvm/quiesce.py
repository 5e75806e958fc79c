"""Application-consistent KVM snapshots: the QEMU guest agent's fsfreeze around the take.

libvirt freezes, snapshots and thaws in one call (``VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE``,
https://libvirt.org/html/libvirt-libvirt-domain-snapshot.html: "use guest agent to quiesce
all mounted file systems within the domain"), all of it inside libvirtd:
``qemuSnapshotCreateActiveExternal`` (src/qemu/qemu_snapshot.c) freezes with
``qemuSnapshotFSFreeze`` before the disks' snapshot and thaws in its ``cleanup`` label
whatever the outcome. So a host worker killed while the guest is frozen does not leave it
frozen: libvirtd finishes the call and thaws. What could (libvirtd itself dying between
the two) is undone by the next quiesced take before anything else: it thaws first.

The guest's agent runs its fsfreeze hook before it freezes and after it thaws
(qemu-guest-agent's ``qga/commands-posix.c``, ``execute_fsfreeze_hook``): that is where a
database flushes and holds its writes (docs/operating/quiesce.md).
"""

from __future__ import annotations

import contextlib

import libvirt

from ...contracts import Consistency, Quiesce
from ...errors import QuiesceUnavailable
from ..quiesce import stopped_vm, without_quiesce
from .export_vm import agent_error

# The agent refuses every command but a few while the guest is frozen (qemu-guest-agent's
# qga/main.c, ga_command_is_blocked: "has been disabled ... the agent is in frozen state").
_FROZEN = "frozen"


def guest_ready(
    dom: libvirt.virDomain, vm: str, quiesce: Quiesce, *, running: bool
) -> tuple[bool, Consistency, str | None]:
    """Whether to freeze through the agent, and the consistency if no freeze happens.

    The agent is asked a harmless question (its host name) first: no channel, an agent
    that is not connected or does not answer (libvirt gives up after its guest-sync wait)
    is the reason a ``yes`` is refused before anything is taken. A guest found frozen is
    thawed: no one can have a freeze open here (the take holds the VM's lock), so it is a
    leftover."""
    if quiesce == Quiesce.NO:
        return False, Consistency.CRASH, None
    if not running:
        consistency, note = stopped_vm(quiesce)
        return False, consistency, note
    message = agent_error(dom)
    if message is not None and _FROZEN not in message:
        consistency, note = without_quiesce(
            quiesce, f"VM {vm!r}'s guest agent does not answer ({message})"
        )
        return False, consistency, note
    if message is not None:
        thaw_leftover(dom, vm, quiesce)
    # libvirt thaws only when the agent froze something (qemu_snapshot.c: "if (frozen > 0)
    # thaw = true"), yet the agent runs the guest's freeze hook whatever it then freezes: a
    # guest with nothing to freeze (root on ZFS, NFS, 9p) would have its hook's freeze never
    # undone. The agent's own list of the file systems it freezes (guest-get-fsinfo, the
    # same build_fs_mount_list as guest-fsfreeze-freeze in qga/commands-posix.c) decides.
    try:
        freezable = dom.fsInfo()
    except libvirt.libvirtError:
        freezable = None  # an agent without guest-get-fsinfo: the freeze says
    if freezable is not None and not freezable:
        consistency, note = without_quiesce(
            quiesce, f"VM {vm!r}'s guest agent sees no file system it can freeze"
        )
        return False, consistency, note
    return True, Consistency.APPLICATION, None


def thaw_if_frozen(dom: libvirt.virDomain) -> None:
    """A retried take that finds its snapshot made: a guest its first attempt left frozen
    (libvirtd gone between the snapshot and the thaw) is thawed now, not at some later
    quiesced take."""
    if _FROZEN in (agent_error(dom) or ""):
        with contextlib.suppress(libvirt.libvirtError):
            dom.fsThaw()


def thaw_leftover(dom: libvirt.virDomain, vm: str, quiesce: Quiesce) -> None:
    try:
        dom.fsThaw()
    except libvirt.libvirtError as exc:
        raise QuiesceUnavailable(
            f"VM {vm!r}'s file systems are frozen and the agent does not thaw them"
            f" ({exc.get_error_message()}); nothing was taken"
        ) from exc
