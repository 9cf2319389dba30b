"""Drawn images of the visual tasks (`colour_digits`): a grid of coloured digits in a hand-written bitmap font.

Rendering is pixel-exact and deterministic, with no font files (PIL's fonts differ between installs): each digit
is a 5x7 dot-matrix glyph, each dot a 3x3 block, so a digit is 15x21 pixels, centred in its own 28x28 cell, one
merged 2x2 patch token of Qwen2-VL's 14-px patches. Every pixel is either the white background or the digit's
palette colour (no anti-aliasing), so a test reads the digits and colours back from the pixels alone.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

CELL = 28  # pixels per grid cell: 2 x Qwen2-VL's 14-px patch, i.e. one vision token after its 2x2 merge
DOT = 3  # pixels per font dot: a 15x21 glyph leaves a margin of at least 3 pixels in the cell
BACKGROUND = (255, 255, 255)
# RGB of the colour names `distill.recipe.Colour` allows: saturated and far apart from each other and from white.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 0, 0),
    "green": (0, 150, 0),
    "blue": (0, 0, 220),
    "orange": (240, 130, 0),
    "purple": (140, 0, 170),
    "black": (0, 0, 0),
}

# 5 columns x 7 rows per digit, top row first; `#` is a lit dot.
FONT: dict[int, tuple[str, ...]] = {
    0: (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    1: ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    2: (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    3: ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    4: ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    5: ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    6: ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    7: ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    8: (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    9: (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}
GLYPH_WIDTH, GLYPH_HEIGHT = 5 * DOT, 7 * DOT
# Where a glyph starts inside its cell: centred, the odd pixel of slack going right and below.
GLYPH_LEFT, GLYPH_TOP = (CELL - GLYPH_WIDTH) // 2, (CELL - GLYPH_HEIGHT) // 2


def digit_grid(digits: list[int], colours: list[str], cols: int) -> Image.Image:
    """An RGB image of `digits` in a grid `cols` cells wide, in reading order (left to right, top to bottom), each
    drawn in its `colours` entry (a `PALETTE` name) in the centre of its own CELL x CELL cell."""
    if len(digits) != len(colours) or len(digits) % cols:
        raise ValueError(f"{len(digits)} digits and {len(colours)} colours do not fill rows of {cols} cells")
    rows = len(digits) // cols
    image = Image.new("RGB", (cols * CELL, rows * CELL), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for index, (digit, colour) in enumerate(zip(digits, colours, strict=True)):
        left = (index % cols) * CELL + GLYPH_LEFT
        top = (index // cols) * CELL + GLYPH_TOP
        for y, line in enumerate(FONT[digit]):
            for x, dot in enumerate(line):
                if dot == "#":
                    # `rectangle` includes both corners: DOT x DOT pixels.
                    corner = (left + x * DOT, top + y * DOT)
                    draw.rectangle([corner, (corner[0] + DOT - 1, corner[1] + DOT - 1)], fill=PALETTE[colour])
    return image
