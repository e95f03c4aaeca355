"""The ``qed`` format driver: QEMU Enhanced Disk images.

``header.py`` (the header and QEMU's checks of it), ``table.py`` (L1/L2
tables and the cluster lookup), ``driver.py`` (the node: guest I/O,
allocation, the need-check flag), ``check.py`` (consistency check and
repair), ``create.py`` (``blockdev-create``).
"""
