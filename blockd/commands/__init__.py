"""QMP command handlers, one module per concern.

Importing this package registers every command with
:mod:`blockd.qmp.registry`.
"""

from blockd.commands import (  # noqa: F401
    bitmaps, block, block_jobs, children, core, jobs, nbd, objects, snapshots, transaction)
