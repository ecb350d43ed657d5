"""Data for training and validation: where the splits are, their datasets and transforms.

Image folders follow the ImageNet layout (`train/` and `val/` or `validation/`, or the split folder
named by --val-split / validate.py's --split, one folder of images per class); how images are
labelled and decoded is in utils/images.py, batching in utils/loaders.py. Any other timm dataset spec
(`--dataset torch/cifar10`, `hfds/...`) goes to timm as is.
Images that cannot be decoded are skipped with a warning and counted (training reads the next image
instead, evaluation leaves them out); too many, over all processes, stop the run. An error raised by
a transform is a bug, not a bad image: it stops the run naming the image and the operation.
"""
import logging
import multiprocessing
import os
import pickle
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from PIL import Image
from timm.data import create_dataset, create_transform, resolve_data_config
from timm.data.loader import adapt_to_chs
from timm.data.readers.class_map import load_class_map
from timm.layers import to_2tuple
from torch.utils.data import Dataset

from models import LoadedCheckpoint
from models.checkpoint import INPUT_OPTIONS
from .augmentation import use_exact_posterize
from .distributed import Runtime
from .errors import ClassFolderError, DataError, OptionError, TransformError
from .images import ClassFolderReader, find_class_folders, log_class_folders, read_rgb

_logger = logging.getLogger(__name__)

EVAL_SPLIT_NAMES = ('val', 'validation')
LAYOUT = ('one folder per split, each with one folder of images per class, e.g. '
          '{root}/train/<class>/<image> and {root}/val/<class>/<image> (val/ may be named validation/)')
# What may go wrong decoding a file that is not a (complete) image; only decoding, never a transform.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def failing_operation(error: BaseException) -> str:
    """The innermost timm or torchvision transform on `error`'s traceback, e.g. AugmentOp(name=Posterize, ...)."""
    failing, frame = 'the transform', error.__traceback__
    while frame is not None:
        owner = frame.tb_frame.f_locals.get('self')
        if callable(owner) and type(owner).__module__.startswith(('timm.data', 'torchvision.transforms')):
            failing = repr(owner)
        frame = frame.tb_next
    return failing


def _listing(folder: str) -> str:
    entries = sorted(os.listdir(folder))
    shown = ', '.join(entries[:10]) + (f' ... ({len(entries)} in all)' if len(entries) > 10 else '')
    return shown or 'nothing (the folder is empty)'


def require_dir(path: str) -> str:
    if not path:
        raise DataError('no data dir given: pass it as the first argument or with --data-dir.')
    if not os.path.isdir(path):
        raise DataError(f'data dir {path} does not exist (or is not a folder); check the path.')
    return path


def _eval_split_dir(root: str, split: str) -> Optional[str]:
    """root/split; for the default names (val, validation) whichever of root/val and root/validation exists."""
    names = EVAL_SPLIT_NAMES if split in EVAL_SPLIT_NAMES else (split,)
    return next((os.path.join(root, s) for s in names if os.path.isdir(os.path.join(root, s))), None)


def _split_label(split: str) -> str:
    return 'val/ (or validation/)' if split in EVAL_SPLIT_NAMES else f'{split}/'


def validation_folder_label(root: str, split: str) -> str:
    """A run's validation folder, named for people: the one that exists under root, else the names it may have."""
    found = _eval_split_dir(root, split) if os.path.isdir(root) else None
    return f'{os.path.basename(found)}/' if found else _split_label(split)


def folder_splits(root: str, train_split: str = 'train', val_split: str = 'validation') -> Tuple[str, str]:
    """The training and validation folders of an ImageNet-style root."""
    require_dir(root)
    train_dir = os.path.join(root, train_split)
    val_dir = _eval_split_dir(root, val_split)
    missing = [name for name, present in ((f'{train_split}/', os.path.isdir(train_dir)),
                                          (_split_label(val_split), val_dir is not None)) if not present]
    if missing:
        raise DataError(f'data dir {root} has no {" and ".join(missing)}; found: {_listing(root)}. '
                        f'Expected layout: {LAYOUT.format(root=root)}.')
    return train_dir, val_dir


def evaluation_folder(path: str, split: str = 'validation') -> str:
    """The split folder to evaluate, given either the split itself or a root that holds it.

    `split` is a subfolder name; the default (val or validation) takes whichever of the two exists.
    """
    require_dir(path)
    split_dir = _eval_split_dir(path, split)
    if split_dir is not None:
        return split_dir
    if split not in EVAL_SPLIT_NAMES and os.path.basename(os.path.normpath(path)) != split:
        raise DataError(f'{path} has no {split}/ (the split asked for); found: {_listing(path)}. Give the root '
                        f'that holds {split}/, or the {split}/ folder itself.')
    subdirs = [e for e in os.listdir(path) if os.path.isdir(os.path.join(path, e))]
    if not subdirs or 'train' in subdirs:
        raise DataError(f'{path} is neither a validation split (one folder of images per class) nor a root '
                        f'with val/ or validation/; found: {_listing(path)}. Expected: '
                        f'{path}/<class>/<image>, or {path}/val/<class>/<image>.')
    return path


class UnreadableImageSkipper(Dataset):
    """An image folder (read by `images.ClassFolderReader`) that skips the images it cannot decode, warning
    about each once and counting them.

    For training (`substitute`) an unreadable image is replaced by the next readable one, so batches
    stay full; for evaluation it is left out (its sample is None, dropped by the loader's collate), so
    no image counts twice. The flags are shared with the DataLoader workers; `check_unreadable`
    merges them over processes and raises when more than `max_bad` images are unreadable.
    """

    def __init__(self, reader: ClassFolderReader, max_bad: int, substitute: bool):
        self.reader = reader
        self.transform = None
        self.image_mode = 'RGB'  # see use_input_channels
        self.max_bad = max_bad
        self.substitute = substitute
        self._is_bad = multiprocessing.RawArray('b', len(self.reader))
        self._num_bad = multiprocessing.Value('i', 0)  # its lock also guards _is_bad

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def num_bad(self) -> int:
        return self._num_bad.value

    def filename(self, index: int) -> str:
        return self.reader.filename(index, absolute=True)

    def merge_over_processes(self, runtime: Runtime) -> int:
        """Flag here the images any process found unreadable; returns their number, the same in every process."""
        if not runtime.distributed:  # the local flags are the answer: no copy to the device, no collective
            return self.num_bad
        flags = torch.frombuffer(self._is_bad, dtype=torch.int8)
        merged = flags.to(runtime.device, copy=True)
        dist.all_reduce(merged, op=dist.ReduceOp.MAX)
        merged = merged.cpu()
        with self._num_bad.get_lock():
            torch.maximum(flags, merged, out=flags)
            self._num_bad.value = int(flags.sum())
        # Not num_bad: workers may flag more images meanwhile, in one process and not the others.
        return int(merged.sum())

    def check(self, runtime: Runtime):
        num_bad = self.merge_over_processes(runtime)
        if num_bad > self.max_bad:
            raise DataError(
                f'{num_bad} images could not be read, more than the {self.max_bad} allowed '
                f'(--max-bad-images); the warnings above name them. Fix or remove those files, '
                f'or raise --max-bad-images.')

    def _mark_bad(self, index: int, error: Exception):
        with self._num_bad.get_lock():
            first_time = not self._is_bad[index]
            self._is_bad[index] = 1
            self._num_bad.value += first_time
        if first_time:
            _logger.warning(f'Skipped unreadable image {self.filename(index)}: {error}')

    def _transformed(self, index: int, image: Image.Image):
        if self.transform is None:
            return image
        try:
            return self.transform(image)
        except Exception as error:
            raise TransformError(
                f'{failing_operation(error)} failed on {self.filename(index)} ({type(error).__name__}: {error}). '
                f'The image decoded, so this is a bug in the transform, not a bad image: please report it '
                f'with this message.') from error

    def __getitem__(self, index: int):
        tries = len(self) if self.substitute else 1  # training goes on to the next images in turn
        for attempt in range(tries):
            i = (index + attempt) % len(self)
            path, target = self.reader.samples[i]
            try:
                image = read_rgb(path)
                if self.image_mode != 'RGB':
                    image = image.convert(self.image_mode)
            except DECODE_ERRORS as error:
                self._mark_bad(i, error)
                continue
            return self._transformed(i, image), target
        if self.substitute:
            raise DataError(f'none of the {len(self)} images in {self.reader.root} can be read.')
        return None  # evaluation leaves it out


def create_split_dataset(name: str, root: str, split: str, max_bad_images: Optional[int] = None,
                         class_map: Optional[dict] = None, keep_empty_classes: bool = False) -> Dataset:
    """A dataset whose `transform` attribute is applied to every image.

    `name` '' (an image folder, `root` being the split folder itself, labelled as utils/images.py says) or
    a timm dataset spec. `max_bad_images` defaults to 1% of the split (at least one); it applies to
    image folders only.
    """
    if name:
        if max_bad_images is not None:
            raise OptionError(f'--max-bad-images applies to image folders only; the timm dataset {name!r} '
                              f'reads its own files and does not skip unreadable ones. Leave out --max-bad-images.')
        try:
            return create_dataset(name, root=root, split=split, is_training=split == 'train')
        except (OSError, RuntimeError, AssertionError, ValueError) as e:
            hint = (' This project never downloads data (torchvision\'s "download=True" hint does not apply): put the '
                    'files torchvision expects under that root first.' if name.startswith('torch/') else '')
            raise DataError(f'cannot create dataset {name!r} (split {split!r}) from {root}: {e}{hint}') from None
    layout = f'Expected layout: {LAYOUT.format(root=os.path.dirname(root) or root)}.'
    try:
        found = find_class_folders(root, class_map, keep_empty_classes)
    except ClassFolderError as e:
        raise DataError(f'{e} {layout}') from None
    except OSError as e:
        raise DataError(f'cannot list {root}: {e.strerror}; make it readable.') from None
    if not found.samples:
        raise DataError(f'found no images in the class folders of {root}. {layout}')
    log_class_folders(root, found)
    if max_bad_images is None:
        max_bad_images = max(1, len(found.samples) // 100)
    return UnreadableImageSkipper(ClassFolderReader(root, found), max_bad_images, substitute=split == 'train')


def class_to_idx(dataset: Dataset) -> Optional[dict]:
    reader = getattr(dataset, 'reader', None)
    return getattr(reader, 'class_to_idx', None) or getattr(dataset, 'class_to_idx', None)


def resolve_num_classes(dataset: Dataset, requested: Optional[int]) -> int:
    """The head size: `requested` if given (and not below the class folders found), else the dataset's count."""
    mapping = class_to_idx(dataset)
    if requested and mapping and len(mapping) > requested:
        raise DataError(f'--num-classes {requested} is fewer than the {len(mapping)} classes of the training split; '
                        f'leave it out to use the class count of the data.')
    return requested or num_classes_of(dataset)


def num_classes_of(dataset: Dataset) -> int:
    mapping = class_to_idx(dataset)
    if mapping:
        return len(mapping)
    classes = getattr(dataset, 'classes', None)
    if classes:
        return len(classes)
    raise DataError('cannot tell how many classes the dataset has; pass --num-classes.')


def wanted_class_map(class_map_file: str, checkpoint: LoadedCheckpoint) -> Tuple[Optional[Dict[str, int]], str]:
    """(class name -> label, where it came from): timm's class map in `class_map_file`, else the `class_to_idx`
    the checkpoint stores, else (None, ''). A map whose labels are not distinct whole numbers from 0 is refused."""
    if class_map_file:
        try:
            class_map, source = load_class_map(class_map_file), f'--class-map {class_map_file}'
        except (AssertionError, ValueError, OSError, pickle.UnpicklingError) as e:
            raise DataError(f'--class-map {class_map_file}: {e}. Give a .txt file with one class name a line, '
                            f'in label order.') from None
    elif checkpoint.class_to_idx is not None:
        class_map, source = checkpoint.class_to_idx, f'the class_to_idx of {checkpoint.path}'
    else:
        return None, ''
    wrong = [label for label in class_map.values()
             if isinstance(label, bool) or not isinstance(label, int) or label < 0]
    if wrong:
        raise DataError(f'{source} is not a class map: its labels must be whole numbers from 0, not {wrong[0]!r}. '
                        f'Give the class map of the training data as --class-map FILE (one class name a line, in '
                        f'label order).')
    shared = sorted(label for label in set(class_map.values()) if list(class_map.values()).count(label) > 1)
    if shared:
        names = [name for name, label in class_map.items() if label == shared[0]]
        raise DataError(f'{source} is not a class map: classes {", ".join(map(repr, names))} share label {shared[0]}, '
                        f'so their images would all count as that one class. Give the class map of the training '
                        f'data as --class-map FILE (one class name a line, in label order).')
    return dict(class_map), source


def class_folder_names(split_dir: str) -> list:
    return [e.name for e in os.scandir(split_dir) if e.is_dir()]


def create_training_datasets(name: str, root: str, train_split: str, val_split: str,
                             max_bad_images: Optional[int], keep_empty_classes: bool = False) -> Tuple[Dataset, Dataset]:
    """Training and validation datasets; the validation classes are labelled as in training."""
    if name:
        require_dir(root)
        return (create_split_dataset(name, root, train_split, max_bad_images),
                create_split_dataset(name, root, val_split, max_bad_images))
    train_dir, val_dir = folder_splits(root, train_split, val_split)
    train_set = create_split_dataset('', train_dir, 'train', max_bad_images, keep_empty_classes=keep_empty_classes)
    train_classes = class_to_idx(train_set)
    unknown = sorted(set(class_folder_names(val_dir)) - set(train_classes))
    if unknown:
        raise DataError(f'{val_dir} has classes that {train_dir} lacks: {", ".join(unknown[:10])}; '
                        f'both splits need the same class folders.')
    val_set = create_split_dataset('', val_dir, 'validation', max_bad_images, class_map=train_classes,
                                   keep_empty_classes=keep_empty_classes)
    return train_set, val_set


def check_unreadable(dataset: Dataset, runtime: Runtime):
    """Raise if all processes together met more unreadable images than the dataset allows.

    Under torchrun every process must call it at the same point: it exchanges the flags, so all
    processes reach the same count and stop together (none is left waiting for the others).
    """
    if isinstance(dataset, UnreadableImageSkipper):
        dataset.check(runtime)


def unreadable_count(dataset: Dataset) -> int:
    return dataset.num_bad if isinstance(dataset, UnreadableImageSkipper) else 0


def given_input_options(args) -> dict:
    """The input options (INPUT_OPTIONS) a script was given, of those it has."""
    return {k: getattr(args, k) for k in INPUT_OPTIONS if getattr(args, k, None) is not None}


def recorded_input_options(recorded_args: dict) -> dict:
    """The input options (INPUT_OPTIONS) a checkpoint records of its training run, where set."""
    return {k: recorded_args[k] for k in INPUT_OPTIONS if recorded_args.get(k) not in (None, '')}


def resolve_input_config(options: dict, model: torch.nn.Module) -> dict:
    """timm's data config (input size, interpolation, crop, mean, std) for `model`.

    Given options win; without an input size the model's own `img_size` is used before its
    pretrained cfg, so a model built for 32 px is fed 32 px (with the channels of its pretrained cfg, which
    create_model_from_checkpoint gives the ones it was trained with).
    """
    options = {k: v for k, v in options.items() if v not in (None, '')}
    if 'input_size' not in options and 'img_size' not in options and hasattr(model, 'img_size'):
        in_chans = options.get('in_chans') or model.pretrained_cfg.get('input_size', (3,))[0]
        options['input_size'] = (in_chans, *to_2tuple(model.img_size))
    # The channels as timm resolves them: the input size's, else in_chans, else the model's pretrained cfg's.
    channels = (options.get('input_size') or [options.get('in_chans') or model.pretrained_cfg['input_size'][0]])[0]
    check_input_channels(channels, model)
    for name in ('mean', 'std'):  # given or recorded ones (timm asserts on them); the model's are adapted below
        if len(options.get(name) or [0]) not in (1, channels):
            raise OptionError(f'the normalisation {name} {tuple(options[name])} has {len(options[name])} values, but '
                              f'the input has {channels} channels; give --{name} with '
                              f'{"1 value" if channels == 1 else f"1 or {channels}"}.')
    config = resolve_data_config(options, model=model)
    # A model's mean and std are its pretrained cfg's, for RGB: for other input, their average (as timm's
    # prefetcher takes it, with a warning), in the workers' normalisation too.
    config.update(mean=adapt_to_chs(config['mean'], channels), std=adapt_to_chs(config['std'], channels))
    return config


def check_input_channels(channels: int, model: torch.nn.Module):
    takes = first_conv_channels(model)
    if takes is not None and channels != takes:
        raise OptionError(f'the input has {channels} channels (--input-size), but the model takes {takes}; give '
                          f'--input-size {takes} H W, or leave it out.')


def first_conv_channels(model: torch.nn.Module) -> Optional[int]:
    """The channels the model's first convolution takes, as its pretrained cfg names it; None if unknown."""
    name = getattr(model, 'pretrained_cfg', {}).get('first_conv')
    try:
        return model.get_submodule(name).in_channels if isinstance(name, str) else None
    except AttributeError:
        return None


# How images are read for an input of 1 or 3 channels, as timm's input_img_mode: grey (luma) or RGB.
IMAGE_MODES = {1: 'L', 3: 'RGB'}


def use_input_channels(dataset: Dataset, channels: int):
    """Make `dataset` give images of the input's channel count; others than 1 or 3 are refused."""
    mode = IMAGE_MODES.get(channels)
    if mode is None:
        raise OptionError(f'the input has {channels} channels, but images are read as RGB (3 channels) or grey (1); '
                          f'give --in-chans 1 or 3 (the model\'s in_chans).')
    if isinstance(dataset, UnreadableImageSkipper):
        dataset.image_mode = mode
    elif hasattr(dataset, 'input_img_mode'):  # timm's ImageDataset
        dataset.input_img_mode = mode
    elif mode != 'RGB':
        raise OptionError(f'{type(dataset).__name__} gives RGB images only, and the input has 1 channel; use an '
                          f'image folder (--dataset \'\') for grey input.')


def create_train_transform(args, data_config: dict, prefetcher: bool = False):
    """Training augmentation from the recipe's options (RandAugment/AutoAugment, random erasing, ...).

    With `prefetcher` it ends in uint8 tensors, and timm's PrefetchLoader normalises and random-erases
    on the device (see utils/loaders.py).
    """
    use_exact_posterize()
    # The options were checked when they were read (utils.args.check_transform_options).
    return create_transform(
        data_config['input_size'], is_training=True, no_aug=args.no_aug, scale=args.scale, ratio=args.ratio,
        hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        interpolation=args.train_interpolation, mean=data_config['mean'], std=data_config['std'],
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, use_prefetcher=prefetcher)


def create_eval_transform(data_config: dict, prefetcher: bool = False):
    """The one evaluation transform, shared by training-time eval and validate.py so they agree exactly."""
    return create_transform(
        data_config['input_size'], is_training=False, interpolation=data_config['interpolation'],
        mean=data_config['mean'], std=data_config['std'], crop_pct=data_config['crop_pct'],
        crop_mode=data_config['crop_mode'], use_prefetcher=prefetcher)
