"""The ``vhdx`` format driver: Hyper-V VHDX images, dynamic and fixed.

``layout.py`` (CRC-32C, GUIDs, the headers, region table and metadata),
``log.py`` (the metadata log: replay on open, entries for BAT updates),
``driver.py`` (the node: guest I/O, block allocation, check), ``create.py``
(``blockdev-create``).
"""
