"""QMP command handlers, one module per concern.

Importing this package registers every command with
:mod:`blockd.qmp.registry`.
"""

from blockd.commands import (bitmaps, block, children, core, jobs, nbd, objects,  # noqa: F401
                             snapshots)
