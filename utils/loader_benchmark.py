"""Loader throughput: images per second that DataLoader workers get through a recipe's transforms.

`benchmark.py --bench data` times the training transform of a recipe (configs/posmlp_t.yaml: random
resized crop with a random interpolation, flip, RandAugment; timm leaves out the recipe's colour
jitter when RandAugment is on) and the evaluation transform (resize and centre crop), both built by
utils/data.py as train.py builds them, each through a
DataLoader with one worker and with N. The images are an image folder's, or JPEGs generated in
ImageNet's sizes. Each (transform, workers) is a loader of its own; rounds of all of them are
interleaved, as benchmarking.py's are. A loader that waits for its next round has already made
the batches its workers prefetch, so each round first takes those, untimed, then times
`steps` batches per worker.
"""
import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .args import parse_train_args
from .benchmarking import rotated
from .data import create_eval_transform, create_split_dataset, create_train_transform, given_input_options

TRANSFORMS = ('train', 'eval')
PREFETCH_FACTOR = 2  # batches each worker makes ahead: DataLoader's default
TABLE_COLUMNS = (
    ('transform', 'transform'), ('workers', 'workers'), ('batch', 'batch_size'), ('img', 'img_size'),
    ('img/s', 'img_per_sec'), ('img/s min-max', 'img_per_sec_range'), ('img/s per worker', 'img_per_sec_per_worker'),
    ('CPU ms/img', 'cpu_ms_per_img'), ('img/s per core', 'img_per_sec_per_core'),
)


def write_sample_jpegs(folder: Path, count: int, long_side: int, seed: int = 0) -> Path:
    """`count` JPEGs in two class folders, `long_side` px on the longer side and 3/4 to all of it on the
    other (ImageNet's photos are mostly 500 px on the longer side). The content is smooth random colour
    with grain, which at quality 90 gives about 110 KB per 500 px image: ImageNet-1k's average (its
    training set is 1,281,167 images in 138 GB)."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        short = int(rng.integers(max(1, long_side * 3 // 4), long_side + 1))
        width, height = (long_side, short) if index % 4 else (short, long_side)  # one in four is upright
        coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
        grain = rng.integers(-20, 21, smooth.shape, dtype=np.int16)
        image = Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))
        class_folder = folder / f'class_{index % 2}'
        class_folder.mkdir(parents=True, exist_ok=True)
        image.save(class_folder / f'{index:05d}.jpg', quality=90)
    return folder


def recipe_transforms(recipe: str, img_size: Optional[int]) -> Tuple[Dict[str, Callable], dict]:
    """The training and evaluation transforms of train.py run with `-c recipe` (and --img-size), and the
    data config they follow."""
    args = parse_train_args(['-c', recipe] + (['--img-size', str(img_size)] if img_size else []))
    options = {k: v for k, v in given_input_options(args).items() if v != ''}
    pretrained_cfg = get_pretrained_cfg(args.model)  # the model's defaults, as train.py reads them off the model
    data_config = resolve_data_config(options, pretrained_cfg=pretrained_cfg and pretrained_cfg.to_dict())
    return dict(train=create_train_transform(args, data_config), eval=create_eval_transform(data_config)), data_config


def image_dataset(folder: str, transform: Callable) -> Dataset:
    """The folder's images (one subfolder per class) read as train.py reads them, through `transform`."""
    dataset = create_split_dataset('', folder, 'train')
    dataset.transform = transform
    return dataset


class CpuTimed(Dataset):
    """Each sample with the CPU seconds its worker spent reading, decoding and transforming it: the cost
    a core pays per image, which other programs' load on a shared machine inflates far less than the
    wall-clock rate."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        start = time.thread_time()
        image, _ = self.dataset[index]
        return image, time.thread_time() - start


class LoaderRun:
    """One transform through a DataLoader of `workers` processes, timed round by round."""

    def __init__(self, dataset: Dataset, batch_size: int, workers: int, steps: int, repeats: int):
        self.timed_batches = steps * workers
        self.images_per_round = self.timed_batches * batch_size
        self.ready_batches = PREFETCH_FACTOR * workers
        batches = repeats * (self.ready_batches + self.timed_batches)
        # Sampling with replacement gives one long pass with no epoch ends (where workers would idle).
        sampler = RandomSampler(dataset, replacement=True, num_samples=batches * batch_size)
        loader = DataLoader(CpuTimed(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
                            prefetch_factor=PREFETCH_FACTOR, drop_last=True)
        self.batches = iter(loader)

    def measure_round(self) -> Tuple[float, float]:
        """Wall-clock seconds for `steps` batches per worker, after the batches the workers made while
        waiting, and the workers' CPU seconds for those images."""
        for _ in range(self.ready_batches):
            next(self.batches)
        cpu_seconds = 0.
        start = time.perf_counter()
        for _ in range(self.timed_batches):
            cpu_seconds += next(self.batches)[1].sum().item()
        return time.perf_counter() - start, cpu_seconds

    def close(self):
        del self.batches  # ends the worker processes


@dataclasses.dataclass(frozen=True)
class LoaderTask:
    transform: str
    workers: int

    @property
    def label(self) -> str:
        return f'{self.transform} transform, {self.workers} worker{"s" if self.workers > 1 else ""}'


def time_loaders(folder: str, recipe: str, img_size: Optional[int], worker_counts: List[int], batch_size: int,
                 steps: int, repeats: int, log: Callable[[str], None]) -> List[Dict[str, object]]:
    """One row per transform and worker count: img/s over all workers and per worker (median of rounds)."""
    transforms, data_config = recipe_transforms(recipe, img_size)
    tasks = [LoaderTask(name, workers) for name in TRANSFORMS for workers in worker_counts]
    runs = []
    try:
        for task in tasks:
            dataset = image_dataset(folder, transforms[task.transform])
            runs.append(LoaderRun(dataset, batch_size, task.workers, steps, repeats))
        timings = [[] for _ in tasks]
        for round_index in range(repeats):
            for i in rotated(len(tasks), round_index):
                wall, cpu = runs[i].measure_round()
                timings[i].append((wall, cpu))
                log(f'round {round_index + 1}/{repeats}  {tasks[i].label}: {runs[i].images_per_round / wall:.1f} '
                    f'img/s, {1000 * cpu / runs[i].images_per_round:.1f} CPU ms/img')
    finally:
        for run in runs:
            run.close()
    common = dict(batch_size=batch_size, img_size=data_config['input_size'][-1], data=folder,
                  images_in_folder=count_files(folder), mean_file_kb=round(mean_file_kb(folder), 1), recipe=recipe)
    return [dict(loader_row(task, times, run.images_per_round), **common)
            for task, run, times in zip(tasks, runs, timings)]


def loader_row(task: LoaderTask, timings: List[Tuple[float, float]], images: int) -> Dict[str, object]:
    rates = sorted(images / wall for wall, _ in timings)
    median = statistics.median(rates)
    cpu_ms = statistics.median(1000 * cpu / images for _, cpu in timings)
    return dict(
        transform=task.transform, workers=task.workers,
        img_per_sec=round(median, 2), img_per_sec_min=round(rates[0], 2), img_per_sec_max=round(rates[-1], 2),
        img_per_sec_per_worker=round(median / task.workers, 2),
        cpu_ms_per_img=round(cpu_ms, 2), img_per_sec_per_core=round(1000 / cpu_ms, 2),
        rounds=len(timings), images_per_round=images,
        round_img_per_sec=[round(images / wall, 2) for wall, _ in timings],
    )


def count_files(folder: str) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def mean_file_kb(folder: str) -> float:
    sizes = [os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(folder) for name in files]
    return sum(sizes) / max(len(sizes), 1) / 1024


def format_cell(key: str, row: Dict[str, object]) -> str:
    if key == 'img_per_sec_range':
        return f'{row["img_per_sec_min"]:.1f}-{row["img_per_sec_max"]:.1f}'
    value = row[key]
    return f'{value:.1f}' if isinstance(value, float) else str(value)


def loader_table_lines(rows: List[Dict[str, object]]) -> List[List[str]]:
    return [[title for title, _ in TABLE_COLUMNS]] + [[format_cell(key, row) for _, key in TABLE_COLUMNS]
                                                      for row in rows]
