"""Block drivers, one package or module per driver.

The registry maps QEMU's driver names to classes, imported on first use
so that starting the daemon does not load every driver.
"""

from __future__ import annotations

import functools
import importlib
import json

from blockd.block.node import BlockNode
from blockd.errors import QMPError

_DRIVERS: dict[str, str] = {
    "file": "blockd.drivers.file:FileNode",
    "host_device": "blockd.drivers.file:HostDeviceNode",
    "raw": "blockd.drivers.raw:RawNode",
    "null-co": "blockd.drivers.null:NullNode",
    "null-aio": "blockd.drivers.null:NullAioNode",
    "blkdebug": "blockd.drivers.blkdebug:BlkdebugNode",
    "qcow2": "blockd.drivers.qcow2.driver:Qcow2Node",
    "luks": "blockd.drivers.luks:LuksNode",
    "nbd": "blockd.drivers.nbd.driver:NbdNode",
    "vpc": "blockd.drivers.vpc.driver:VpcNode",
    "vdi": "blockd.drivers.vdi.driver:VdiNode",
    "vhdx": "blockd.drivers.vhdx.driver:VhdxNode",
    "vmdk": "blockd.drivers.vmdk.driver:VmdkNode",
    "quorum": "blockd.drivers.quorum:QuorumNode",
    "blkverify": "blockd.drivers.blkverify:BlkverifyNode",
    "qed": "blockd.drivers.qed.driver:QedNode",
    "qcow": "blockd.drivers.qcow.driver:QcowNode",
    "parallels": "blockd.drivers.parallels.driver:ParallelsNode",
    "dmg": "blockd.drivers.dmg:DmgNode",
    "bochs": "blockd.drivers.bochs:BochsNode",
    "cloop": "blockd.drivers.cloop:CloopNode",
}


def driver_names() -> list[str]:
    return list(_DRIVERS)


@functools.cache
def qemu_driver_names() -> frozenset[str]:
    """Every driver QEMU 7.2 knows, from the schema (``x-qemu-enum`` of BlockdevDriver)."""
    from blockd.qmp.schema import SCHEMA_DIR

    with open(SCHEMA_DIR / "types" / "BlockdevDriver.json") as f:
        return frozenset(json.load(f)["x-qemu-enum"])


#: Drivers in QEMU's schema that qemu-storage-daemon and qemu-img are built without
#: (record/replay needs a virtual machine): refused with their words.
_SYSTEM_EMULATOR_ONLY = frozenset({"blkreplay"})


def unsupported(name: str) -> QMPError:
    """The refusal of a driver QEMU has and blockd lacks: never a guess such as raw."""
    if name in _SYSTEM_EMULATOR_ONLY:
        return QMPError(f"Unknown driver '{name}'")
    return QMPError(f"Driver '{name}' is not supported by blockd")


def driver_class(name: str) -> type[BlockNode]:
    """The node class for ``driver`` (schema validation has vetted the name)."""
    target = _DRIVERS.get(name)
    if target is None:
        if name in qemu_driver_names():
            raise unsupported(name)
        raise QMPError(f"Parameter 'driver' does not accept value '{name}'")
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError:
        raise QMPError(f"Driver '{name}' is not available") from None
