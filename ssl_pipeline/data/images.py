"""Torch datasets over a sample table's images, tolerant of unreadable files."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ssl_pipeline.data.table import SampleTable

log = logging.getLogger(__name__)


def open_image(path: str) -> Image.Image:
    """Open an image file fully (decode now, not lazily) as RGB.

    Grayscale, palette, CMYK and RGBA images are converted (RGBA composited on
    white). Raises ``OSError``/``ValueError`` for unreadable, truncated, empty or
    mislabelled files.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGB", im.size, (255, 255, 255))
                bg.paste(im, mask=im.getchannel("A"))
                return bg
            return im.convert("RGB")


class TableImages(torch.utils.data.Dataset):
    """Images of ``table.rows`` through ``transform``; an unreadable image yields ``None``.

    Items are ``(tensor (3, S, S) or None, row, error message or "")``.
    """

    def __init__(self, table: SampleTable, rows: np.ndarray, transform):
        self.table = table
        self.rows = np.asarray(rows, np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, row: int) -> Image.Image:
        if self.table.load_image is not None:
            return self.table.load_image(row).convert("RGB")
        return open_image(self.table.paths[row])

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        try:
            img = self.load(row)
            return self.transform(img), row, ""
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError,
                Image.DecompressionBombWarning, SyntaxError) as e:
            return None, row, f"{type(e).__name__}: {e}"


def collate_skipping(batch):
    """Stack readable images; return (images (B, 3, S, S) or None, rows (B,), skipped [(row, reason)])."""
    ok = [(x, r) for x, r, _ in batch if x is not None]
    skipped = [(r, err) for x, r, err in batch if x is None]
    images = torch.stack([x for x, _ in ok]) if ok else None
    rows = torch.tensor([r for _, r in ok], dtype=torch.long)
    return images, rows, skipped
