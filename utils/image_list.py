"""Images to predict on, named by a folder (searched recursively), a file list or a single image path.

A file list is a text file with one image path a line (blank lines and lines starting with # are
skipped); relative paths are taken from the list's own folder, so a list travels with its images.
The dataset skips images it cannot read, naming each in a warning (utils.data.UnreadableImageSkipper),
and gives each image's index as its target, so predictions stay matched to their files.
"""
import logging
import os
from typing import List, Tuple

from timm.data.readers.reader import Reader

from .data import UnreadableImageSkipper
from .errors import DataError
from .images import image_extensions

_logger = logging.getLogger(__name__)

FILE_LIST_SUFFIXES = ('.txt', '.lst')


class ImageListReader(Reader):
    """timm Reader over a list of image paths, each with the name results give it; the target of each
    image is its index in the list."""

    def __init__(self, paths: List[str], names: List[str], root: str):
        super().__init__()
        self.paths = paths
        self.names = names
        self.root = root
        self.samples = [(path, index) for index, path in enumerate(paths)]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.samples[index]

    def _filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        path = self.paths[index]
        if basename:
            return os.path.basename(path)
        return os.path.abspath(path) if absolute else self.names[index]


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in image_extensions()


def _folder_images(folder: str) -> List[str]:
    images, others = [], []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            (images if _is_image(name) else others).append(os.path.join(parent, name))
    if others:
        shown = ', '.join(os.path.relpath(p, folder) for p in others[:5])
        _logger.warning(f'Left out {len(others)} file(s) in {folder} that are not images by their ending '
                        f'({"/".join(sorted(image_extensions()))}): {shown}{" ..." if len(others) > 5 else ""}')
    return images


def _listed_images(list_path: str) -> List[str]:
    try:
        with open(list_path, encoding='utf-8') as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f'cannot read the file list {list_path}: {e}') from None
    return [line for line in lines if line and not line.startswith('#')]


def image_paths(source: str) -> Tuple[List[str], List[str], str]:
    """(image paths, their names in results, the folder they are found from) for a folder, a file list or
    one image. Names are paths relative to the folder, as written in the list, or the image path as given."""
    if os.path.isdir(source):
        paths, root = _folder_images(source), source
        names = [os.path.relpath(p, source) for p in paths]
    elif os.path.isfile(source) and source.lower().endswith(FILE_LIST_SUFFIXES):
        names, root = _listed_images(source), os.path.dirname(os.path.abspath(source))
        paths = [os.path.join(root, name) for name in names]
    elif os.path.isfile(source) and _is_image(source):
        paths, names, root = [source], [source], os.path.dirname(os.path.abspath(source))
    elif os.path.isfile(source):
        raise DataError(f'{source} is neither an image ({"/".join(sorted(image_extensions()))}) nor a file list '
                        f'({"/".join(FILE_LIST_SUFFIXES)}, one image path a line); give one of those or a folder.')
    else:
        raise DataError(f'{source} does not exist; give an image, a folder of images or a file list.')
    if not paths:
        raise DataError(f'{source} names no images ({"/".join(sorted(image_extensions()))}).')
    return paths, names, root


def image_list_dataset(source: str) -> UnreadableImageSkipper:
    """The images of `source` as a dataset (`transform` to be set) that leaves out the unreadable ones."""
    paths, names, root = image_paths(source)
    return UnreadableImageSkipper(ImageListReader(paths, names, root), max_bad=len(paths), substitute=False)
