"""The layout of patchmine's pictures: where the cells of a montage, an overview sheet or a
context view lie, and how large their tiles are.

Public names: Grid, montage_grid, overview_grid, context_grid, tile_side, thumb_side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Grid", "montage_grid", "overview_grid", "context_grid", "tile_side", "thumb_side"]

PAD = 6
MIN_TILE = 112  # montage tiles are at least this many pixels wide
THUMB = 64  # overview tiles
CONTEXT = 200  # context view cells


@dataclass(frozen=True)
class Grid:
    """Where the cells of a picture lie: ``n`` cells of ``tile`` x ``tile`` pixels in ``cols``
    columns, each with a ``label_h`` pixel label beneath, ``pad`` pixels apart, under a ``header_h``
    pixel title.
    """

    n: int
    cols: int
    tile: int
    label_h: int
    pad: int = PAD
    header_h: int = 0

    @property
    def rows(self) -> int:
        return max(1, math.ceil(self.n / self.cols))

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole picture."""
        w = self.pad + self.cols * (self.tile + self.pad)
        h = self.header_h + self.pad + self.rows * (self.tile + self.label_h + self.pad)
        return w, h

    def cell(self, i: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of cell ``i``: its tile and its label."""
        r, c = divmod(i, self.cols)
        x = self.pad + c * (self.tile + self.pad)
        y = self.header_h + self.pad + r * (self.tile + self.label_h + self.pad)
        return x, y, x + self.tile, y + self.tile + self.label_h

    def tile_box(self, i: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the picture part of cell ``i``."""
        x0, y0, x1, _ = self.cell(i)
        return x0, y0, x1, y0 + self.tile

    def label_box(self, i: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the label part of cell ``i``."""
        x0, y0, x1, y1 = self.cell(i)
        return x0, y0 + self.tile, x1, y1


LABEL_SIZE = 13
LINE = LABEL_SIZE + 4
LABEL_H = 2 * LINE + 4
HEADER_SIZE = 15
HEADER_H = HEADER_SIZE + 12


def montage_grid(k: int, patch_size: int) -> Grid:
    """The montage layout for ``k`` patches of ``patch_size`` pixels (3 x 3 for k = 9)."""
    cols = max(1, math.ceil(math.sqrt(k)))
    return Grid(k, cols, tile_side(patch_size), label_h=LABEL_H, header_h=HEADER_H)


def overview_grid(channels: int, patch_size: int) -> Grid:
    """The overview layout: one thumbnail per channel, a little wider than tall."""
    cols = max(1, math.ceil(math.sqrt(channels * 1.5)))
    cols = min(cols, channels) if channels else 1
    return Grid(channels, cols, thumb_side(patch_size), label_h=15, pad=4, header_h=HEADER_H)


def context_grid(k: int) -> Grid:
    """The context-view layout for ``k`` winners."""
    cols = max(1, math.ceil(math.sqrt(k)))
    return Grid(k, cols, CONTEXT, label_h=LABEL_H, header_h=HEADER_H)


def tile_side(p: int) -> int:
    """Side of a montage tile: at least `MIN_TILE`, a whole multiple of small patches."""
    return p * math.ceil(MIN_TILE / p) if p < MIN_TILE else p


def thumb_side(patch_size: int) -> int:
    """Side of an overview tile: a whole multiple of small patches, else ``THUMB``."""
    p = patch_size
    return p * math.ceil(THUMB / p) if p < THUMB else THUMB
