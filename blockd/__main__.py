"""``python3 -m blockd`` runs the daemon (same as the ``blockd`` script)."""

import sys

from blockd.cli import main

sys.exit(main())
