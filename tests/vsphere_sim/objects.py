"""The simulated vCenter's fixed managed objects and names: one datacenter, its VM folder,
two datastores, and the service objects a client finds in ServiceContent.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pyVmomi import vim, vmodl

DC, DS = "dc1", "ds1"
SI = vim.ServiceInstance("ServiceInstance")
ROOT_FOLDER = vim.Folder("group-d1")
DATACENTER = vim.Datacenter("datacenter-2")
VM_FOLDER = vim.Folder("group-v3")
DATASTORE = vim.Datastore("datastore-11")
# A second datastore, so that a VM can have its home on one and a disk on another, and
# two disks may have the same file name on two datastores (base names are unique per
# datastore, not per VM).
DS2 = "ds2"
DATASTORE2 = vim.Datastore("datastore-12")
DATASTORES = {DS: DATASTORE, DS2: DATASTORE2}
PROPERTY_COLLECTOR = vmodl.query.PropertyCollector("propertyCollector")
SESSION_MANAGER = vim.SessionManager("SessionManager")
SEARCH_INDEX = vim.SearchIndex("SearchIndex")
FILE_MANAGER = vim.FileManager("FileManager")

# Names of VMs and folders: "The name is too long. Up to 80 characters may be used (fewer
# if the characters %, \ or / are used)" (vCenter 6.7's answer, VMware KB 2051649;
# terraform-provider-vsphere validates StringLenBetween(1, 80),
# vsphere/virtual_machine_config_structure.go). CloneVM_Task: "Any % (percent) character
# used in this name parameter must be escaped, unless it is used to start an escape
# sequence" (vSphere API reference), so a % arrives as %25; / and \ are stored as %2f and
# %5c, three characters each.
MAX_NAME = 80


def now() -> datetime:
    return datetime.now(UTC)


def escaped_length(name: str) -> int:
    """A name's length as vCenter counts it: ``/`` and ``\\`` are stored as ``%2f``, ``%5c``."""
    return len(name) + 2 * (name.count("/") + name.count("\\"))
