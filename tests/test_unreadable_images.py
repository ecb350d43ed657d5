"""Unreadable images under torchrun: every process counts the ones any process met, each once, and all
processes decide together whether there are too many."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

from conftest import make_image_folder
from utils.data import check_unreadable, create_split_dataset, unreadable_count
from utils.distributed import Runtime
from utils.errors import DataError


def _check(dataset, runtime) -> str:
    try:
        check_unreadable(dataset, runtime)
    except DataError as e:
        return str(e)
    return f'{unreadable_count(dataset)} within the allowance'


def _meet_bad_images_and_check(rank, root):
    dist.init_process_group('gloo', init_method=f'file://{root}/rendezvous', rank=rank, world_size=2)
    runtime = Runtime(torch.device('cpu'), rank, rank, world_size=2)
    dataset = create_split_dataset('', str(root / 'data' / 'train'), 'train', max_bad_images=1)
    dataset[0]  # both processes meet image 0, as training's reshuffled epochs do
    outcomes = [_check(dataset, runtime)]
    if rank == 1:
        dataset[3]  # then only process 1 meets image 3
    outcomes.append(_check(dataset, runtime))
    (root / f'rank{rank}.txt').write_text('\n'.join(outcomes))
    dist.destroy_process_group()


def test_processes_count_each_unreadable_image_once_and_stop_together(tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=2, splits=('train',))
    (data / 'train' / 'a' / 'a_0.png').write_bytes(b'')  # image 0
    (data / 'train' / 'b' / 'b_1.png').write_bytes(b'')  # image 3
    torch.multiprocessing.spawn(_meet_bad_images_and_check, args=(tmp_path,), nprocs=2)
    for rank in (0, 1):
        first, second = (tmp_path / f'rank{rank}.txt').read_text().splitlines()
        assert first == '1 within the allowance'
        assert second.startswith('2 images could not be read, more than the 1 allowed')


def test_one_process_counts_from_its_own_flags_without_copies_or_collectives(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / 'data', per_class=2, splits=('train',))
    (data / 'train' / 'a' / 'a_0.png').write_bytes(b'')  # image 0
    (data / 'train' / 'b' / 'b_1.png').write_bytes(b'')  # image 3
    dataset = create_split_dataset('', str(data / 'train'), 'train', max_bad_images=1)
    dataset[0]

    def forbidden(*args, **kwargs):
        raise AssertionError('one process needs no copy of the flags and no collective')
    monkeypatch.setattr(torch.Tensor, 'to', forbidden)
    monkeypatch.setattr(dist, 'all_reduce', forbidden)
    assert _check(dataset, Runtime(torch.device('cpu'))) == '1 within the allowance'
    dataset[3]
    with pytest.raises(DataError, match='2 images could not be read, more than the 1 allowed'):
        check_unreadable(dataset, Runtime(torch.device('cpu')))
