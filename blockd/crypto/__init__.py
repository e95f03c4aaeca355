"""Disk encryption: sector ciphers (``cipher``) and the LUKS1 format (``luks``).

Everything cryptographic comes from the ``cryptography`` package
(OpenSSL); this package only arranges keys, IVs and on-disk layouts the
way QEMU and cryptsetup do, so images are interchangeable with them.
"""
