"""The ``nbd`` client driver: ``handshake.py`` (connecting and negotiating),
``connection.py`` (requests in flight on one connection), ``driver.py`` (the node)."""
