"""utils/loaders.py: timm's prefetcher path gives the batches of the plain path (checked on the CPU, where its
PrefetchLoader runs without streams), the defaults follow the device and the CPUs, and mixup turns off."""
import json
import random

import numpy as np
import pytest
import torch
from timm.data import FastCollateMixup
from timm.data.loader import PrefetchLoader
from torchvision.transforms import Normalize

from conftest import TINY_MODEL_ARGS, make_image_folder

import train
import validate
from utils import args as args_module
from utils.args import default_workers, train_parser
from utils.data import create_split_dataset
from utils.distributed import Runtime
from utils.loaders import LoaderOptions, build_eval_loader, build_train_loader, loader_options, stop_mixing

CPU = Runtime(torch.device('cpu'))
DATA_CONFIG = dict(input_size=(3, 32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                   interpolation='bicubic', crop_pct=0.875, crop_mode='center')
# One std of the recipe's normalisation spans 255 * std levels; FastCollateMixup rounds mixed images to levels.
HALF_A_LEVEL = 0.5 / (255 * min(DATA_CONFIG['std'])) + 1e-5


def recipe_args(*argv):
    return train_parser().parse_args(['--aa', 'rand-m9-mstd0.5-inc1', '-b', '4', '--reprob', '0', *argv])


def seeded(loader, seed=0):
    """The batches of one pass over `loader`, from the same random state every time."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    yield from loader


@pytest.fixture(scope='module')
def image_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('loaders') / 'data', per_class=4)


def train_batches(root, prefetcher: bool, *argv, workers=0):
    """One epoch of training batches as the step sees them (mixed on the device when the loader does not mix)."""
    args = recipe_args(*argv)
    dataset = create_split_dataset('', str(root / 'train'), 'train')
    loader, device_mixup = build_train_loader(dataset, args, DATA_CONFIG, CPU, 3,
                                              LoaderOptions(workers, False, prefetcher))
    out = []
    for images, targets in seeded(loader):  # mixed batch by batch: the transforms and mixup share numpy's state
        if device_mixup is not None:
            images, targets = device_mixup(images, targets)
        out.append((images, targets))
    return loader, out


@pytest.mark.parametrize('mixing', [[], ['--mixup', '0.8', '--cutmix', '1.0']], ids=['plain', 'mixup-cutmix'])
def test_prefetcher_training_batches_equal_the_plain_ones(image_root, mixing):
    mixup_off = ['--mixup', '0', '--cutmix', '0'] if not mixing else mixing
    plain_loader, plain = train_batches(image_root, False, *mixup_off)
    prefetch_loader, prefetched = train_batches(image_root, True, *mixup_off)
    assert isinstance(prefetch_loader, PrefetchLoader) and not isinstance(plain_loader, PrefetchLoader)
    assert len(plain) == len(prefetched) == 3  # 12 images in batches of 4
    for (images, targets), (p_images, p_targets) in zip(plain, prefetched):
        assert p_images.dtype == torch.float32 and p_images.shape == images.shape == (4, 3, 32, 32)
        tolerance = HALF_A_LEVEL if mixing else 1e-5  # unmixed: float rounding only
        assert (p_images - images).abs().max() <= tolerance
        assert torch.allclose(p_targets.float(), targets.float())


def test_prefetcher_evaluation_batches_equal_the_plain_ones_and_leave_unreadable_images_out(tmp_path):
    root = make_image_folder(tmp_path / 'data', per_class=2, splits=('val',))
    (root / 'val' / 'a' / 'a_0.png').write_bytes(b'')
    (root / 'val' / 'a' / 'a_1.png').write_bytes(b'')
    loaded = []
    for prefetcher in (False, True):
        dataset = create_split_dataset('', str(root / 'val'), 'validation')
        loaded.append(list(build_eval_loader(dataset, DATA_CONFIG, 2, CPU, LoaderOptions(0, False, prefetcher))))
    for (images, targets), (p_images, p_targets) in zip(*loaded):
        assert torch.equal(targets, p_targets) and torch.allclose(p_images, images, rtol=0, atol=1e-5)
    assert [len(t) for _, t in loaded[1]] == [0, 2, 2]  # a batch of only unreadable images is empty


def test_the_prefetcher_normalises_and_erases_on_the_device_and_the_workers_send_uint8(image_root):
    args = recipe_args('--reprob', '0.25', '--mixup', '0', '--cutmix', '0')
    dataset = create_split_dataset('', str(image_root / 'train'), 'train')
    loader, _ = build_train_loader(dataset, args, DATA_CONFIG, CPU, 3, LoaderOptions(0, False, True))
    assert loader.random_erasing is not None and loader.random_erasing.probability == 0.25
    steps = [type(t).__name__ for t in dataset.transform.transforms]
    assert 'RandomErasing' not in steps and not any(isinstance(t, Normalize) for t in dataset.transform.transforms)
    assert loader.loader.dataset[0][0].dtype == torch.uint8


def test_turning_mixup_off_reaches_the_loader_workers(image_root):
    """With the prefetcher, mixup runs in the workers (FastCollateMixup): --mixup-off-epoch must reach them."""
    args = recipe_args('--mixup', '1.0', '--cutmix', '0', '--smoothing', '0', '--mixup-off-epoch', '1')
    dataset = create_split_dataset('', str(image_root / 'train'), 'train')
    loader, device_mixup = build_train_loader(dataset, args, DATA_CONFIG, CPU, 3, LoaderOptions(1, False, True))
    assert device_mixup is None and isinstance(loader.loader.collate_fn, FastCollateMixup)
    mixed = [targets for _, targets in seeded(loader)]
    assert any(((t > 0) & (t < 1)).any() for t in mixed)
    stop_mixing(loader, device_mixup)
    unmixed = [targets for _, targets in seeded(loader)]
    assert all(((t == 0) | (t == 1)).all() for t in unmixed)


def test_defaults_follow_the_device():
    args = train_parser().parse_args([])
    assert args.prefetcher is None and args.pin_mem is None
    assert loader_options(args, torch.device('cpu')) == LoaderOptions(args.workers, False, False)
    assert loader_options(args, torch.device('cuda')) == LoaderOptions(args.workers, True, True)
    args = train_parser().parse_args(['--no-prefetcher', '--no-pin-mem'])
    assert loader_options(args, torch.device('cuda')) == LoaderOptions(args.workers, False, False)
    args = train_parser().parse_args(['--prefetcher', '--pin-mem'])
    assert loader_options(args, torch.device('cpu')) == LoaderOptions(args.workers, False, True)


@pytest.mark.parametrize('cpus, local_world_size, workers', [(16, None, 15), (16, '4', 3), (96, '8', 11), (2, '2', 1)])
def test_default_workers_share_the_cpus_of_this_process_among_the_nodes_processes(
        monkeypatch, cpus, local_world_size, workers):
    monkeypatch.setattr(args_module.os, 'sched_getaffinity', lambda pid: set(range(cpus)))
    if local_world_size is None:
        monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    else:
        monkeypatch.setenv('LOCAL_WORLD_SIZE', local_world_size)
    assert default_workers() == workers


def test_train_and_validate_run_the_prefetcher_path_on_the_cpu(tmp_path, capsys, in_process_run):
    data = make_image_folder(tmp_path / 'data', per_class=4)
    argv = [str(data), *TINY_MODEL_ARGS, '-b', '4', '-j', '0', '--threads', '1', '--epochs', '1', '--warmup-epochs',
            '0', '--mixup', '0.8', '--cutmix', '1.0', '--reprob', '0.25', '--aa', 'rand-m9-mstd0.5-inc1',
            '--output', str(tmp_path / 'out'), '--experiment', 'run']
    assert train.main([*argv, '--prefetcher']) == 0
    assert 'timm prefetcher' in (tmp_path / 'out' / 'run' / 'train.log').read_text()
    checkpoint = str(tmp_path / 'out' / 'run' / 'last.pth.tar')
    results = []
    for switch in ('--prefetcher', '--no-prefetcher'):
        capsys.readouterr()
        assert validate.main([str(data), '--checkpoint', checkpoint, '-j', '0', '-b', '3', switch]) == 0
        out = capsys.readouterr().out
        results.append(json.loads(out[out.index('{'):]))
    assert results[0]['images'] == results[1]['images'] == 12
    assert results[0]['loss'] == pytest.approx(results[1]['loss'], rel=1e-4)
