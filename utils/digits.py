"""scikit-learn's handwritten digits as an ImageFolder (train/ and val/), the quickstart's data set.

scikit-learn ships the 1,797 8x8 digit images inside the package, so nothing is downloaded. They are
written once as upscaled RGB PNGs, `<root>/{train,val}/<digit>/<index>.png`, with a fixed stratified
80/20 split.
"""
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError
from .outputs import atomic_folder

_logger = logging.getLogger(__name__)

SPLITS = ('train', 'val')


def digits_ready(root) -> bool:
    root = Path(root)
    return all((root / split).is_dir() for split in SPLITS)


def prepare_digits(root, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write the digits under `root` unless they are already there; returns `root`.

    The folder is assembled beside `root` and renamed into place, so an interrupted preparation
    never looks finished and is simply redone.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not root:
        raise DataError('the digits need a folder to be written to: give a data dir, e.g. --data-dir data/digits.')
    root = Path(root)
    if digits_ready(root):
        return root
    if root.exists() and any(root.iterdir()):
        raise DataError(
            f'{root} exists but does not hold the prepared digits (no train/ and val/ inside); '
            f'remove it or point data_dir at an empty or missing folder.')
    root.parent.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(
        indices, test_size=val_fraction, random_state=seed, stratify=digits.target)
    with atomic_folder(str(root)) as staging:
        for split, split_idx in zip(SPLITS, (train_idx, val_idx)):
            for i in sorted(split_idx):
                folder = Path(staging) / split / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                # Pixel values are 0..16 (ink); scaled to 0..255 and smoothly upscaled.
                pixels = (digits.images[i] * (255. / 16.)).round().astype(np.uint8)
                image = Image.fromarray(pixels).resize((size, size), Image.BICUBIC).convert('RGB')
                image.save(folder / f'{i:04d}.png')
    _logger.info(f'Wrote scikit-learn digits to {root}: {len(train_idx)} train and {len(val_idx)} val images, '
                 f'{size}x{size} RGB PNG.')
    return root
