"""The ``vpc`` format driver: Virtual PC / Hyper-V VHD images, fixed and dynamic.

``footer.py`` (the footer, its checksum and the CHS geometry rules),
``dynamic.py`` (the dynamic disk header and the block allocation table),
``driver.py`` (the node: guest I/O, block allocation), ``create.py``
(``blockdev-create``).
"""
