"""Errors that travel back to a QMP client.

QEMU reports almost every failure as class ``GenericError`` with a
human-readable ``desc``; a few situations use a dedicated class.  Code
anywhere in the daemon raises :class:`QMPError` and the dispatcher turns
it into the wire reply, so handlers never build error dicts by hand.
"""

from __future__ import annotations


class QMPError(Exception):
    """A failure to report to the client as ``{"error": {class, desc}}``.

    ``hint`` is QEMU's extra line for humans: QMP replies leave it out,
    ``blockd-img`` prints it after the message as ``qemu-img`` does.
    """

    def __init__(self, desc: str, cls: str = "GenericError", hint: str = "") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls
        self.hint = hint

    def human(self) -> str:
        """The message as ``qemu-img`` prints it: the hint on a line of its own."""
        return f"{self.desc}\n{self.hint}" if self.hint else self.desc

    def __str__(self) -> str:
        return self.desc


class TooLarge(QMPError):
    """A size the format cannot address (QEMU's EFBIG): ``qemu-img create`` reports it as
    "The image size is too large for file format ..." instead of the driver's words."""


class CommandNotFound(QMPError):
    def __init__(self, desc: str) -> None:
        super().__init__(desc, "CommandNotFound")


class DeviceNotFound(QMPError):
    def __init__(self, desc: str) -> None:
        super().__init__(desc, "DeviceNotFound")
