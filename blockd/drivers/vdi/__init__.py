"""The ``vdi`` format driver: VirtualBox disk images, static and dynamic.

``header.py`` (the header, its checks and QEMU's probe), ``driver.py``
(the node: guest I/O, block allocation), ``check.py`` (``qemu-img check``),
``create.py`` (``blockdev-create``).
"""

from blockd.drivers.vdi.header import probe

__all__ = ["probe"]
