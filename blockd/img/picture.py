"""``map --picture``: the image file drawn as a grid, one cell per host cluster.

Cells are coloured by what the cluster holds (header, tables, refcount
structures, bitmaps, data, compressed data, free or leaked space), left
to right and top to bottom in file order, with a legend giving each
kind's count.  PNG is written directly (zlib and a few chunks, text in a
built-in 5x7 font) so no imaging library is needed; SVG is plain text.
"""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from xml.sax.saxutils import escape

#: Kinds in legend order, with their colours.
COLOURS: dict[str, tuple[int, int, int]] = {
    "header": (220, 20, 60),
    "luks header": (255, 105, 180),
    "L1 table": (255, 140, 0),
    "L2 table": (255, 215, 0),
    "refcount table": (128, 0, 128),
    "refcount block": (186, 85, 211),
    "bitmap": (0, 139, 139),
    "snapshot table": (139, 69, 19),
    "data": (30, 144, 255),
    "compressed": (46, 139, 87),
    "leaked": (0, 0, 0),
    "free": (225, 225, 225),
}
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)

# 5x7 glyphs, one 5-bit row each (most significant bit leftmost), for the legend.
_FONT: dict[str, tuple[int, ...]] = {
    "a": (0, 0, 14, 1, 15, 17, 15), "b": (16, 16, 30, 17, 17, 17, 30),
    "c": (0, 0, 15, 16, 16, 16, 15), "d": (1, 1, 15, 17, 17, 17, 15),
    "e": (0, 0, 14, 17, 31, 16, 14), "f": (6, 8, 8, 30, 8, 8, 8),
    "h": (16, 16, 30, 17, 17, 17, 17), "i": (4, 0, 12, 4, 4, 4, 14),
    "k": (16, 16, 18, 20, 24, 20, 18), "l": (12, 4, 4, 4, 4, 4, 14),
    "m": (0, 0, 26, 21, 21, 21, 21), "n": (0, 0, 30, 17, 17, 17, 17),
    "o": (0, 0, 14, 17, 17, 17, 14), "p": (0, 30, 17, 17, 30, 16, 16),
    "r": (0, 0, 22, 25, 16, 16, 16), "s": (0, 0, 15, 16, 14, 1, 30),
    "t": (8, 8, 30, 8, 8, 9, 6), "u": (0, 0, 17, 17, 17, 19, 13),
    "L": (16, 16, 16, 16, 16, 16, 31),
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14),
    "2": (14, 17, 1, 2, 4, 8, 31), "3": (31, 2, 4, 2, 1, 17, 14),
    "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8),
    "8": (14, 17, 17, 14, 17, 17, 14), "9": (14, 17, 17, 15, 1, 2, 12),
    "(": (2, 4, 8, 8, 8, 4, 2), ")": (8, 4, 2, 2, 2, 4, 8),
    " ": (0, 0, 0, 0, 0, 0, 0),
}
_SCALE = 2          # legend text: 10x14 pixels per glyph
_ADVANCE = 6 * _SCALE
_LINE = 9 * _SCALE


def grid(count: int) -> tuple[int, int, int]:
    """(columns, cell size, gap) that keep small images readable and big ones bounded."""
    if count <= 4096:
        return 64, 10, 1
    if count <= 65536:
        return 256, 4, 1
    return 1024, 1, 0


def legend(kinds: list[str]) -> list[tuple[str, str]]:
    """(kind, label) for the kinds present, in legend order."""
    counts = Counter(kinds)
    return [(k, f"{k} ({counts[k]})") for k in COLOURS if counts[k]]


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.rows = [bytearray(bytes(_BACKGROUND) * width) for _ in range(height)]

    def fill(self, x: int, y: int, w: int, h: int, rgb: tuple[int, int, int]) -> None:
        run = bytes(rgb) * w
        for row in self.rows[y:y + h]:
            row[x * 3:(x + w) * 3] = run

    def text(self, x: int, y: int, text: str) -> None:
        for ch in text:
            for r, bits in enumerate(_FONT.get(ch, _FONT[" "])):
                for col in range(5):
                    if bits & (16 >> col):
                        self.fill(x + col * _SCALE, y + r * _SCALE, _SCALE, _SCALE, _TEXT)
            x += _ADVANCE

    def png(self) -> bytes:
        raw = b"".join(b"\0" + bytes(row) for row in self.rows)

        def chunk(tag: bytes, data: bytes) -> bytes:
            return (struct.pack(">I", len(data)) + tag + data
                    + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

        ihdr = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _layout(kinds: list[str]) -> tuple[int, int, int, int, int, int]:
    cols, cell, gap = grid(len(kinds))
    rows = -(-len(kinds) // cols) or 1
    pitch = cell + gap
    labels = legend(kinds)
    width = max(cols * pitch + gap, 20 + max((len(t) for _, t in labels), default=0) * _ADVANCE
                + 2 * _LINE)
    grid_h = rows * pitch + gap
    height = grid_h + 10 + len(labels) * (_LINE + 4) + 10
    return cols, cell, pitch, width, grid_h, height


def render_png(kinds: list[str]) -> bytes:
    cols, cell, pitch, width, grid_h, height = _layout(kinds)
    gap = pitch - cell
    canvas = _Canvas(width, height)
    for i, kind in enumerate(kinds):
        canvas.fill(gap + (i % cols) * pitch, gap + (i // cols) * pitch, cell, cell,
                    COLOURS[kind])
    y = grid_h + 10
    for kind, label in legend(kinds):
        canvas.fill(10, y, _LINE, _LINE, (80, 80, 80))
        canvas.fill(11, y + 1, _LINE - 2, _LINE - 2, COLOURS[kind])
        canvas.text(10 + _LINE + 8, y + 2, label)
        y += _LINE + 4
    return canvas.png()


def render_svg(kinds: list[str], title: str) -> str:
    cols, cell, pitch, width, grid_h, height = _layout(kinds)
    gap = pitch - cell
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}">',
           f"<title>{escape(title)}</title>",
           f'<rect width="{width}" height="{height}" fill="white"/>']
    # Runs of one kind within a row become one rectangle, which keeps big images small.
    i = 0
    while i < len(kinds):
        j = i
        while j + 1 < len(kinds) and kinds[j + 1] == kinds[i] and (j + 1) % cols:
            j += 1
        r, g, b = COLOURS[kinds[i]]
        n = j - i + 1
        out.append(f'<rect x="{gap + (i % cols) * pitch}" y="{gap + (i // cols) * pitch}" '
                   f'width="{n * pitch - gap}" height="{cell}" fill="rgb({r},{g},{b})" '
                   f'data-kind="{kinds[i]}" data-count="{n}"/>')
        i = j + 1
    y = grid_h + 10
    for kind, label in legend(kinds):
        r, g, b = COLOURS[kind]
        out.append(f'<rect x="10" y="{y}" width="{_LINE}" height="{_LINE}" '
                   f'fill="rgb({r},{g},{b})" stroke="#505050"/>')
        out.append(f'<text x="{18 + _LINE}" y="{y + _LINE - 3}" font-family="monospace" '
                   f'font-size="{_LINE - 2}">{escape(label)}</text>')
        y += _LINE + 4
    out.append("</svg>")
    return "\n".join(out) + "\n"
