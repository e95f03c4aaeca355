"""Finding the zero pieces of a buffer, so a copy can leave them as holes.

``convert`` runs it on every chunk it has read, before deciding what to
write.
"""

from __future__ import annotations

import functools
import mmap


def zero_runs(buf: mmap.mmap, start: int, stop: int, guest: int, gran: int
              ) -> list[tuple[int, int]]:
    """Runs of whole ``gran``-aligned (in guest terms) zero pieces in ``buf[start:stop]``,
    as indexes into ``buf``; ``buf[start]`` is the guest byte at ``guest``.  A
    ``gran`` of 0 (``-S 0``) finds none.

    A piece can only be zero if its first and last bytes are: strided slices
    gather those bytes for every piece in one C call each, so data without
    zero pieces costs about two bytes per piece, and only candidates cost a
    Python step and a compare.  A zero run is then extended ``_WIDE`` bytes
    per compare, and its last few pieces in halving steps.  (``mmap.find``
    bounded to the piece compares at memcmp speed; ``bytearray.find`` with
    bounds does not.)
    """
    if gran <= 0:
        return []
    first = start + (-guest) % gran
    count = (stop - first) // gran
    if count <= 0:
        return []
    end = first + count * gran
    zeros = _zeros(gran)
    # Pieces per compare while a zero run lasts: a power of two, about _WIDE bytes.
    wide = 1 << (max(1, _WIDE // gran).bit_length() - 1)
    heads = buf[first:end:gran]
    tails = buf[first + gran - 1:end:gran]
    runs: list[tuple[int, int]] = []
    k = heads.find(0)
    while k >= 0:
        a = first + k * gran
        if tails[k] == 0 and buf.find(zeros, a, a + gran) == a:
            b = a + gran
            step = wide * gran
            while b + step <= end and buf.find(_zeros(step), b, b + step) == b:
                b += step
            # Fewer than ``wide`` zero pieces are left: one compare per halving.
            while step > gran:
                step //= 2
                if b + step <= end and buf.find(_zeros(step), b, b + step) == b:
                    b += step
            runs.append((a, b))
            k = (b - first) // gran  # the piece at b has data (or is past the end)
        k = heads.find(0, k + 1)
    return runs


#: Bytes compared at once while a zero run lasts (at least one piece).
_WIDE = 256 << 10


@functools.lru_cache(maxsize=32)
def _zeros(n: int) -> bytes:
    return bytes(n)
