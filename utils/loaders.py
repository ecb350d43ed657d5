"""Batches for training and evaluation: sampling, collation, the copy to the device and mixup/cutmix.

Two paths, as in timm's train.py:
- the prefetcher (default on CUDA): workers decode and augment into uint8 tensors, `fast_collate`
  batches them into pinned memory, and timm's PrefetchLoader copies each batch to the device on a side
  stream while the previous one trains, then normalises and random-erases it there. Mixup/cutmix is
  done in the collate on uint8 (timm's FastCollateMixup).
- --no-prefetcher (default on the CPU): workers return normalised float images (random erasing
  included), and mixup/cutmix runs on the device (timm's Mixup), in utils/engine.py.
The pieces are timm's; its create_loader is not used because its evaluation sampler pads each
process's share with repeated images (OrderedDistributedSampler), which would count them twice, and
its training sampler does not take the run's seed.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from timm.data import FastCollateMixup, Mixup
from timm.data.loader import PrefetchLoader, fast_collate
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler, default_collate

from .data import create_eval_transform, create_train_transform, use_input_channels
from .distributed import Runtime


@dataclass
class LoaderOptions:
    """How batches are made and reach the device (from -j, --pin-mem and --prefetcher)."""
    workers: int
    pin_memory: bool
    prefetcher: bool

    @property
    def description(self) -> str:
        return (f'{self.workers} DataLoader worker(s) per process, '
                + ('timm prefetcher (uint8 batches normalised on the device)' if self.prefetcher else 'no prefetcher')
                + (', pinned memory' if self.pin_memory else ''))


def loader_options(args, device: torch.device) -> LoaderOptions:
    """The loader options given, with --pin-mem and --prefetcher on by default exactly when on CUDA."""
    on_cuda = device.type == 'cuda'
    pin_memory = args.pin_mem if args.pin_mem is not None else on_cuda
    prefetcher = args.prefetcher if args.prefetcher is not None else on_cuda
    return LoaderOptions(args.workers, pin_memory and on_cuda, prefetcher)  # pinning serves copies to CUDA only


class UnpaddedDistributedSampler(Sampler):
    """Every rank-th index from this rank's offset, without the padding DistributedSampler adds, so
    summing results over processes counts every sample exactly once."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        self.indices = range(rank, len(dataset), num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class CollateReadable:
    """`collate` over the samples that could be read (unreadable ones are None); a batch without any is
    empty, 0 images of `image_shape`, so that it passes through the prefetcher like any other."""

    def __init__(self, collate: Callable, image_shape: Tuple[int, ...], image_dtype: torch.dtype):
        self.collate = collate
        self.image_shape = tuple(image_shape)
        self.image_dtype = image_dtype

    def __call__(self, samples: list):
        readable = [s for s in samples if s is not None]
        if readable:
            return self.collate(readable)
        return torch.zeros((0, *self.image_shape), dtype=self.image_dtype), torch.zeros(0, dtype=torch.long)


def mixup_arguments(args, num_classes: int) -> Optional[dict]:
    """timm's Mixup/FastCollateMixup arguments from the options; None when mixup and cutmix are off."""
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    return dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                label_smoothing=args.smoothing, num_classes=num_classes)


def _prefetching(loader: DataLoader, data_config: dict, runtime: Runtime, **random_erasing) -> PrefetchLoader:
    return PrefetchLoader(loader, mean=data_config['mean'], std=data_config['std'],
                          channels=data_config['input_size'][0], device=runtime.device, **random_erasing)


def build_train_loader(dataset: Dataset, args, data_config: dict, runtime: Runtime, num_classes: int,
                       options: LoaderOptions) -> Tuple[object, Optional[Mixup]]:
    """Shuffled, drop-last batches of `dataset` under the recipe's training transform, sharded per process.

    Returns the loader and the Mixup for the device (None with the prefetcher, which mixes in the collate,
    or without mixup).
    """
    mixing = mixup_arguments(args, num_classes)
    dataset.transform = create_train_transform(args, data_config, prefetcher=options.prefetcher)
    use_input_channels(dataset, data_config['input_size'][0])
    collate, device_mixup = None, None
    if options.prefetcher:
        collate = FastCollateMixup(**mixing) if mixing else fast_collate
    elif mixing:
        device_mixup = Mixup(**mixing)
    sampler = None
    if runtime.distributed:
        sampler = DistributedSampler(dataset, runtime.world_size, runtime.rank, shuffle=True, seed=args.seed)
    # Workers run the collate on copies of it: turning mixup off (--mixup-off-epoch) reaches them only when
    # they are started anew, so those are not kept from epoch to epoch.
    persistent = options.workers > 0 and not (options.prefetcher and mixing and args.mixup_off_epoch)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None, drop_last=True,
        num_workers=options.workers, pin_memory=options.pin_memory, persistent_workers=persistent,
        collate_fn=collate)
    if options.prefetcher:
        erasing = dict(re_prob=0. if args.no_aug else args.reprob, re_mode=args.remode, re_count=args.recount)
        loader = _prefetching(loader, data_config, runtime, **erasing)
    return loader, device_mixup


def stop_mixing(loader, device_mixup: Optional[Mixup]):
    """Turn mixup/cutmix off for the following epochs (--mixup-off-epoch), wherever it is done."""
    if isinstance(loader, PrefetchLoader):
        loader.mixup_enabled = False
    if device_mixup is not None:
        device_mixup.mixup_enabled = False


def build_eval_loader(dataset: Dataset, data_config: dict, batch_size: int, runtime: Runtime,
                      options: LoaderOptions):
    """All samples of `dataset` in order under the evaluation transform, split over processes without
    padding, unreadable images left out (a batch of only unreadable images is empty)."""
    dataset.transform = create_eval_transform(data_config, prefetcher=options.prefetcher)
    use_input_channels(dataset, data_config['input_size'][0])
    if runtime.distributed:
        sampler = UnpaddedDistributedSampler(dataset, runtime.world_size, runtime.rank)
    else:
        sampler = SequentialSampler(dataset)
    if options.prefetcher:
        collate = CollateReadable(fast_collate, data_config['input_size'], torch.uint8)
    else:
        collate = CollateReadable(default_collate, data_config['input_size'], torch.float32)
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=options.workers,
        pin_memory=options.pin_memory, persistent_workers=options.workers > 0, collate_fn=collate)
    return _prefetching(loader, data_config, runtime) if options.prefetcher else loader
