"""The qcow2 format driver, split as the format is: header, mapping, refcounts, compression."""
