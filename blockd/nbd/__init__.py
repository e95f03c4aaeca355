"""The NBD server: wire format (:mod:`blockd.nbd.protocol`) and asyncio serving (:mod:`blockd.nbd.server`)."""
