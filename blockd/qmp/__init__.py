"""QMP: the wire protocol and the dispatcher."""
