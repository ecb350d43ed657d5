"""Image folders as the model sees them: which class each image belongs to, and its pixels as 8-bit RGB.

Labels follow the ImageNet layout of torchvision's ImageFolder: a class is a folder directly under
the split, and every image below it, at any depth, belongs to it (`train/n01/extra_shots/x.jpg` is
n01's). Classes are numbered in timm's natural order of their names. A class folder without images
is refused unless it is kept as a class on purpose (--keep-empty-classes). Linked folders are followed (class
folders are often links into a shared copy of ImageNet), except a link back to the split, to a class folder or
to a folder already walked (a loop, which would list its images again under the wrong class): it is left out
with a warning. A file reached twice inside one class folder is listed once, with a warning; one reached under
two class folders (one of them through a link) is refused, since it would carry two labels.

Pixels: every mode Pillow opens becomes the 8-bit RGB a person would see; values are scaled, never
clipped (Pillow's own convert('RGB') clips 16-bit grey to nearly white):
- 8-bit modes ('1', 'L', 'P', 'RGB', 'RGBX', 'CMYK', 'YCbCr', 'LAB', 'HSV'): Pillow's conversion
  (CMYK as (255 - C)(255 - K) / 255, YCbCr as JPEG defines it, LAB through CIE XYZ). 16-bit RGB PNGs
  already open as 8-bit RGB (Pillow keeps the high byte).
- 16-bit grey ('I;16', 'I;16L', 'I;16B', 'I;16N'): value / 257, so 65535 is 255.
- 32-bit integer grey ('I'): scaled from the range of the bit depth the file records (TIFF's
  BitsPerSample and SampleFormat: 0..2^b-1 unsigned, -2^(b-1)..2^(b-1)-1 signed). Without one it is
  16-bit, 0..65535 (Pillow decodes 16-bit PGM/PPM into 'I' on that range), unless the values fall
  outside it, and then the 32-bit signed range.
- floating point ('F'): [0, 1], the range of float images, is scaled to [0, 255]; values outside it
  widen the range to [min(0, lowest), max(1, highest)]. NaN or infinite values make the image unreadable.
- transparency (alpha in 'RGBA', 'LA', 'PA', premultiplied 'RGBa' and 'La', a transparent palette
  entry or colour of 'P', 'L', 'RGB', 'I;16'...): composited over white, as a page shows the image.
Scaled values are rounded to the nearest level, halves up. Embedded ICC profiles and EXIF orientation are not
applied, as in timm and torchvision, whose pretrained weights were trained and evaluated without them.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image
from timm.data.readers.img_extensions import get_img_extensions
from timm.data.readers.reader_image_folder import ReaderImageFolder
from timm.utils.misc import natural_key

from .errors import ClassFolderError

_logger = logging.getLogger(__name__)

WHITE = 255
SIXTEEN_BIT_GREY = ('I;16', 'I;16L', 'I;16B', 'I;16N')
PREMULTIPLIED_ALPHA = ('RGBa', 'La')
# torchvision's ImageFolder extensions (timm's own list has only .png, .jpg and .jpeg).
TORCHVISION_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
# TIFF tags that say how many bits a sample has and whether it is signed.
TIFF_BITS_PER_SAMPLE, TIFF_SAMPLE_FORMAT, TIFF_SIGNED = 258, 339, 2


def image_extensions() -> set:
    return get_img_extensions(as_set=True) | set(TORCHVISION_EXTENSIONS)


@dataclass
class ClassFolders:
    """The images of a split and their labels, by the folder directly under the split they lie in."""
    samples: List[Tuple[str, int]]  # (path, label), in timm's natural order of the paths
    class_to_idx: Dict[str, int]
    in_subfolders: int  # images in folders below their class folder
    not_images: int  # files under the class folders left out because their extension is not an image's
    empty_classes: List[str]  # class folders with no image at any depth, kept as classes on request
    loops: List[str]  # linked folders left out: they lead back to the split, a class folder or a walked folder
    repeats: List[str]  # images reached a second time in their class folder through a link, left out


@dataclass
class _Walk:
    """What walking the class folders of one split has seen so far."""
    split_dir: str
    protected: List[str]  # real paths of the split and its class folders: a link to one (or above one) is a loop
    listed: Dict[str, str] = field(default_factory=dict)  # real path of each image listed -> the path it is listed by
    loops: List[str] = field(default_factory=list)
    repeats: List[str] = field(default_factory=list)

    def class_of(self, path: str) -> str:
        return os.path.relpath(path, self.split_dir).split(os.sep)[0]


def _unlistable(error: OSError):
    raise ClassFolderError(f'cannot list {error.filename}: {error.strerror}; its images would be left out. '
                           f'Make it readable, or remove it.')


def _listing(folder: str) -> list:
    """The entries of `folder`, links last: an image reached both directly and through a link keeps its own path."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda entry: (entry.is_symlink(), entry.name))
    except OSError as e:
        _unlistable(e)


def _leads_back(real: str, walk: _Walk, visited: set) -> bool:
    """Whether the folder at `real` was walked already, or is (or holds) the split or a class folder."""
    return real in visited or any(p == real or p.startswith(real + os.sep) for p in walk.protected)


def _listed_once(path: str, real: str, walk: _Walk) -> bool:
    """Record the image at `path` (real path `real`); False when its class folder lists it already."""
    first = walk.listed.setdefault(real, path)
    if first is path:
        return True
    if walk.class_of(first) != walk.class_of(path):
        raise ClassFolderError(
            f'{first} and {path} are the same image ({real}), reached through a link under class folders '
            f'{walk.class_of(first)} and {walk.class_of(path)}: it would carry both labels. Remove the link, so that '
            f'each image lies under one class folder.')
    walk.repeats.append(path)
    return False


def _real_path(entry: os.DirEntry, directory: str, real_directory: str) -> str:
    """The real path of an entry that is no link, from its folder's: no system call (nor new string) per image."""
    return entry.path if directory == real_directory else os.path.join(real_directory, entry.name)


def _images_below(folder: str, extensions: set, walk: _Walk) -> Tuple[List[str], int, int]:
    """(image paths at any depth below `folder`, how many lie in its subfolders, files that are not images)."""
    images, in_subfolders, not_images = [], 0, 0
    visited = {os.path.realpath(folder)}
    pending = [(folder, os.path.realpath(folder))]
    while pending:
        directory, real_directory = pending.pop()
        for entry in _listing(directory):
            real = os.path.realpath(entry.path) if entry.is_symlink() else _real_path(entry, directory, real_directory)
            if entry.is_dir():
                if _leads_back(real, walk, visited):
                    walk.loops.append(entry.path)
                else:
                    visited.add(real)
                    pending.append((entry.path, real))
            elif os.path.splitext(entry.name)[1].lower() not in extensions:
                not_images += 1
            elif _listed_once(entry.path, real, walk):
                images.append(entry.path)
                in_subfolders += directory != folder
    return images, in_subfolders, not_images


def find_class_folders(split_dir: str, class_to_idx: Optional[Dict[str, int]] = None,
                       keep_empty: bool = False) -> ClassFolders:
    """Label the images of `split_dir` by their class folder (see the module's docstring).

    `class_to_idx` gives the labels (training's, or a checkpoint's class map); every class folder must be
    in it. Without it the class folders are numbered in natural order.
    """
    extensions = image_extensions()
    entries = sorted(os.scandir(split_dir), key=lambda e: natural_key(e.name))
    loose = [e.name for e in entries if e.is_file() and os.path.splitext(e.name)[1].lower() in extensions]
    if loose:
        raise ClassFolderError(
            f'{split_dir} holds images directly; they need one subfolder per class, {split_dir}/<class>/<image> '
            f'(the layout of torchvision\'s ImageFolder). Found {", ".join(loose[:3])}{" ..." if len(loose) > 3 else ""}.')
    classes = [e.name for e in entries if e.is_dir()]
    if class_to_idx is None:
        class_to_idx = {name: label for label, name in enumerate(classes)}
    unknown = [name for name in classes if name not in class_to_idx]
    if unknown:
        raise ClassFolderError(f'{split_dir} has class folders without a label: {", ".join(unknown[:10])}.')
    samples, in_subfolders, not_images, empty = [], 0, 0, []
    walk = _Walk(split_dir, [os.path.realpath(p) for p in (split_dir, *(os.path.join(split_dir, n) for n in classes))])
    for name in classes:
        images, below, others = _images_below(os.path.join(split_dir, name), extensions, walk)
        samples += [(path, class_to_idx[name]) for path in images]
        in_subfolders += below
        not_images += others
        if not images:
            empty.append(name)
    if empty and not keep_empty:
        raise ClassFolderError(
            f'{split_dir} has class folders with no images ({" ".join(sorted(extensions))}) at any depth: '
            f'{", ".join(empty[:10])}{f" ... ({len(empty)} in all)" if len(empty) > 10 else ""}. Remove them, or '
            f'pass --keep-empty-classes to keep them as classes (the head keeps a label for each).')
    samples.sort(key=lambda sample: natural_key(sample[0]))
    return ClassFolders(samples, dict(class_to_idx), in_subfolders, not_images, empty, walk.loops, walk.repeats)


class ClassFolderReader(ReaderImageFolder):
    """timm's image-folder reader (items, file names, `class_to_idx`) over the images `find_class_folders`
    labelled: its own __init__ would label each image by the folder it lies in, not by its class folder."""

    def __init__(self, root: str, found: ClassFolders):  # not the parent's __init__: that is the labelling replaced
        self.root = root
        self.samples = found.samples
        self.class_to_idx = found.class_to_idx


def log_class_folders(split_dir: str, found: ClassFolders):
    """Say what labelling by class folder found beyond the plain layout."""
    if found.in_subfolders:
        _logger.info(f'{split_dir}: {found.in_subfolders} of {len(found.samples)} images lie in subfolders of their '
                     f'class folder; each is labelled by the class folder directly under {split_dir}.')
    if found.not_images:
        _logger.warning(f'{split_dir}: {found.not_images} files in the class folders are not images by their '
                        f'extension ({" ".join(sorted(image_extensions()))}) and are left out.')
    if found.loops:
        _logger.warning(f'{split_dir}: left out {len(found.loops)} linked folders that lead back to the split, a class '
                        f'folder or a folder already walked (a loop; their images are listed where they lie): '
                        f'{", ".join(found.loops[:3])}{" ..." if len(found.loops) > 3 else ""}. Remove the links.')
    if found.repeats:
        _logger.warning(f'{split_dir}: {len(found.repeats)} images are reached twice in their class folder through '
                        f'links and listed once: {", ".join(found.repeats[:3])}{" ..." if len(found.repeats) > 3 else ""}.')
    if found.empty_classes:
        _logger.warning(f'{split_dir}: kept {len(found.empty_classes)} class folders without images as classes '
                        f'(--keep-empty-classes): {", ".join(found.empty_classes[:10])}.')


def _scaled(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """`values` from [low, high] onto 0..255, rounded to the nearest level."""
    return np.floor((values.astype(np.float64) - low) * (255. / (high - low)) + 0.5).astype(np.uint8)


def _integer_range(image: Image.Image, values: np.ndarray) -> Tuple[int, int]:
    """The range of a 32-bit integer image's bit depth (see the module's docstring)."""
    tags = getattr(image, 'tag_v2', None) or {}
    if TIFF_BITS_PER_SAMPLE in tags:
        bits, sample_format = (np.ravel(tags.get(tag, 1))[0] for tag in (TIFF_BITS_PER_SAMPLE, TIFF_SAMPLE_FORMAT))
        if sample_format == TIFF_SIGNED:
            return -2 ** (int(bits) - 1), 2 ** (int(bits) - 1) - 1
        return 0, 2 ** int(bits) - 1
    if values.size == 0 or (values.min() >= 0 and values.max() <= 65535):
        return 0, 65535
    return -2 ** 31, 2 ** 31 - 1


def _float_range(values: np.ndarray) -> Tuple[float, float]:
    if not np.isfinite(values).all():
        raise ValueError('its floating-point pixels include NaN or infinite values, which have no grey level')
    if values.size == 0:
        return 0., 1.
    return min(0., float(values.min())), max(1., float(values.max()))


def _wide_grey(image: Image.Image) -> np.ndarray:
    """An 'I;16*', 'I' or 'F' image as 8-bit grey, scaled; its transparent value, if any, white."""
    values = np.asarray(image)
    if image.mode == 'F':
        grey = _scaled(values, *_float_range(values))
    else:
        grey = _scaled(values, *(_integer_range(image, values) if image.mode == 'I' else (0, 65535)))
    transparent = image.info.get('transparency')
    if isinstance(transparent, int):
        grey[values == transparent] = WHITE
    return grey


def _over_white(image: Image.Image) -> np.ndarray:
    """An image with transparency composited over white, as (H, W, 3) uint8."""
    if image.mode in PREMULTIPLIED_ALPHA:
        values = np.asarray(image).astype(np.int32)
        colour, alpha = values[..., :-1], values[..., -1:]
        return np.broadcast_to(colour + (WHITE - alpha), (*values.shape[:2], 3)).astype(np.uint8)
    values = np.asarray(image.convert('RGBA')).astype(np.int32)
    colour, alpha = values[..., :3], values[..., 3:]
    return ((colour * alpha + WHITE * (255 - alpha) + 127) // 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as the 8-bit RGB a person would see (the rules are in this module's docstring)."""
    if image.mode in (*SIXTEEN_BIT_GREY, 'I', 'F'):
        return Image.fromarray(_wide_grey(image), 'L').convert('RGB')
    if image.has_transparency_data:
        return Image.fromarray(_over_white(image), 'RGB')
    return image.convert('RGB')


def read_rgb(path: str) -> Image.Image:
    """Decode the image file at `path` completely (so a truncated file fails here) as 8-bit RGB."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)
