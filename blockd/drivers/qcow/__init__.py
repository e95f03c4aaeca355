"""The ``qcow`` format driver: version 1 of the QEMU Copy-On-Write format.

``header.py`` (the header and QEMU's checks of it), ``driver.py`` (the
node: L1/L2 lookup, compressed and encrypted clusters, allocation),
``create.py`` (``blockdev-create``).
"""
