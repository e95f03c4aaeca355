"""QMP command handlers, one module per concern.

Importing this package registers every command with
:mod:`blockd.qmp.registry`.
"""

from blockd.commands import bitmaps, block, core, jobs, nbd, objects, snapshots  # noqa: F401
