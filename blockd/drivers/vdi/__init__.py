"""The ``vdi`` format driver: VirtualBox disk images, static and dynamic.

``header.py`` (the header and its checks), ``driver.py``
(the node: guest I/O, block allocation), ``check.py`` (``qemu-img check``),
``create.py`` (``blockdev-create``).
"""
