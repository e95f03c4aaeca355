"""What one QMP client has negotiated, kept per connection by the server."""

from __future__ import annotations


class SessionState:
    """Per-client negotiation state."""

    def __init__(self) -> None:
        self.negotiated = False
        self.oob_enabled = False
