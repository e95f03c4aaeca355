"""blockd: a block-storage daemon that speaks QMP like qemu-storage-daemon 7.2."""

__version__ = "0.1.0"

#: The QEMU version whose QMP behaviour blockd reproduces.
QEMU_VERSION = (7, 2, 0)
