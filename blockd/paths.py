"""File names from QMP as the operating system gets them.

QMP strings may contain U+0000, which no C string can.  QEMU's JSON
parser stores it as the two bytes C0 80 ("modified UTF-8"), so such a
name reaches the OS with those bytes in place of the NUL; blockd does
the same, so a NUL in a name is an ordinary (usually missing) file,
never a crash.
"""

from __future__ import annotations


def os_path(path: str) -> bytes:
    """The bytes QEMU would pass to the OS for a file name given over QMP."""
    return path.encode("utf-8", "surrogateescape").replace(b"\0", b"\xc0\x80")


def display_path(path: str) -> str:
    """A name as GLib displays it: the C0 80 pair is invalid UTF-8, shown as two U+FFFD."""
    return path.replace("\0", "\ufffd\ufffd")
