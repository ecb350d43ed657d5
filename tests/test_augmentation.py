"""Augmentation never stops a run: every op of every timm policy at its extreme levels, on this Pillow, in
DataLoader workers too; a transform that fails anyway is reported as a bug, naming the image and the op."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import ImageDataset
from timm.data.auto_augment import AugMixAugment, AugmentOp, AutoAugment, RandAugment

from conftest import TINY_MODEL_ARGS, make_image_folder

import train
from utils.args import train_parser
from utils.augmentation import posterize
from utils.errors import TransformError
from utils.data import create_split_dataset, create_train_transform

DATA_CONFIG = dict(input_size=(3, 32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                   interpolation='bicubic', crop_pct=0.875, crop_mode='center')
# Every policy family timm accepts, at the ends of its settings: magnitude 0 and 10 (and above 10 with mmax),
# magnitude noise off and on, the increasing and plain op sets, 1 to 4 layers, the weighted op sets.
POLICIES = [
    'rand-m0-n1-mstd0-inc0', 'rand-m10-n4-mstd0-inc0', 'rand-m0-n1-mstd0-inc1', 'rand-m10-n4-mstd1-inc1',
    'rand-m9-mstd0.5-inc1', 'rand-m6-n3-mstd1.0-inc1', 'rand-m10-mstd1-tweights', 'rand-m10-n2-t3a',
    'rand-m10-t3aw', 'rand-m20-mmax20-inc1', 'original', 'original-mstd1', 'originalr', 'v0', 'v0-mstd1', 'v0r',
    '3a', 'augmix-m0-w1-d1', 'augmix-m10-w4-d3-mstd1', 'augmix-m10-w3-b1',
]


def recipe_transform(policy: str):
    args = train_parser().parse_args(['--aa', policy, '--reprob', '0.25'])
    return create_train_transform(args, DATA_CONFIG)


def policy_of(transform):
    (policy,) = [t for t in transform.transforms if isinstance(t, (RandAugment, AutoAugment, AugMixAugment))]
    return policy


def ops_of(policy) -> list:
    return [op for sub in policy.policy for op in sub] if isinstance(policy, AutoAugment) else list(policy.ops)


def only(policy, op: AugmentOp):
    """Make `policy` apply exactly `op` to every image."""
    if isinstance(policy, AutoAugment):
        policy.policy = [[op]]
    else:
        policy.ops = [op]
    if isinstance(policy, RandAugment):
        policy.num_layers, policy.choice_weights = 1, None


def forced(op: AugmentOp, magnitude: float) -> AugmentOp:
    op = copy.copy(op)
    op.prob, op.magnitude, op.magnitude_std = 1., magnitude, 0.
    return op


@pytest.mark.parametrize('policy_name', POLICIES)
def test_every_op_of_the_policy_runs_at_its_extreme_levels_through_the_training_transform(policy_name):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    transform = recipe_transform(policy_name)
    policy = policy_of(transform)
    ops = ops_of(policy)
    assert ops
    top = max(10, ops[0].magnitude_max or 10)
    failures = []
    for op in ops:
        for magnitude in sorted({0, top, op.magnitude}):
            only(policy, forced(op, magnitude))
            try:
                out = transform(image)
            except Exception as e:
                failures.append(f'{op.name} at magnitude {magnitude}: {type(e).__name__}: {e}')
                continue
            assert out.shape == (3, 32, 32) and torch.isfinite(out).all()
    assert not failures, f'{policy_name}: ' + '; '.join(failures)


@pytest.mark.parametrize('mode', ['RGB', 'L'])
def test_posterize_keeps_bits_as_pillow_did_and_zero_bits_give_black(mode):
    """Pillow < 13 masked each value with ~(2**(8 - bits) - 1): no bit kept for bits <= 0, a black image."""
    shape = (7, 9, 3) if mode == 'RGB' else (7, 9)
    values = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    image = Image.fromarray(values, mode)
    for bits in range(-4, 9):
        kept = 0 if bits < 1 else (0xFF << (8 - bits)) & 0xFF
        out = posterize(image, bits)
        assert out.mode == mode and out.size == image.size
        assert np.array_equal(np.asarray(out), values & kept), bits


def posterize_everything(dataset):
    """`dataset` with a transform that posterizes every image to 0 bits (RandAugment at magnitude 10, inc1)."""
    dataset.transform = recipe_transform('rand-m10-n1-mstd0-inc1')
    policy = policy_of(dataset.transform)
    only(policy, forced(next(op for op in policy.ops if op.name == 'PosterizeIncreasing'), 10))
    return dataset


@pytest.mark.parametrize('start_method', ['fork', 'spawn'])
def test_zero_bit_posterize_runs_in_loader_workers(tmp_path, start_method):
    data = make_image_folder(tmp_path / 'data', classes=('a', 'b'), per_class=1, splits=('train',))
    # timm's dataset: the project's shares its unreadable-image flags in the default start method's context.
    dataset = posterize_everything(ImageDataset(str(data / 'train')))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, multiprocessing_context=start_method)
    images, targets = next(iter(loader))
    assert images.shape == (2, 3, 32, 32) and sorted(targets.tolist()) == [0, 1]


def test_a_failing_transform_names_the_image_and_the_op_and_is_not_an_unreadable_image(tmp_path):
    data = make_image_folder(tmp_path / 'data', classes=('a', 'b'), per_class=1, splits=('train',))
    dataset = posterize_everything(create_split_dataset('', str(data / 'train'), 'train'))

    def broken(img, *args, **kwargs):
        raise ValueError('an op that fails')
    policy_of(dataset.transform).ops[0].aug_fn = broken
    with pytest.raises(TransformError) as raised:
        dataset[0]
    message = str(raised.value)
    assert str(data / 'train' / 'a' / 'a_0.png') in message
    assert 'AugmentOp(name=PosterizeIncreasing' in message and 'ValueError: an op that fails' in message
    assert dataset.num_bad == 0


def test_a_policy_timm_does_not_know_is_named_in_one_line(tmp_path, capsys, in_process_run):
    data = make_image_folder(tmp_path / 'data', per_class=2)
    with pytest.raises(SystemExit) as stopped:
        train.main([str(data), *TINY_MODEL_ARGS, '--aa', 'rand-q3', '--epochs', '1', '-j', '0',
                    '--output', str(tmp_path / 'out')])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert 'error: --aa rand-q3: not an augmentation policy timm knows' in err and 'Traceback' not in err
    assert not (tmp_path / 'out').exists()
