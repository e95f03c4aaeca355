"""The ``parallels`` format driver: Parallels / OpenVZ (ploop) disk images.

``header.py`` (the header and its checks), ``driver.py`` (the node: guest
I/O, cluster allocation, the in-use flag), ``check.py`` (``qemu-img
check`` and its repairs), ``create.py`` (``blockdev-create``).
"""
