"""train.py's options as parsed: defaults, configs and the command line, and the values they refuse."""
import pytest
import torch
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

from conftest import ROOT

from utils.args import parse_train_args

CONFIGS = ROOT / 'configs'


def scheduled_epochs(args) -> int:
    """The epochs train.py runs with these options: the schedule's, cooldown included."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    _, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=1)
    return num_epochs


def test_epochs_are_the_epochs_run_unless_a_recipe_adds_cooldown():
    assert scheduled_epochs(parse_train_args(['data', '--epochs', '1'])) == 1
    assert scheduled_epochs(parse_train_args(['-c', str(CONFIGS / 'posmlp_t.yaml'), 'data'])) == 310
    for recipe in ('posmlp_s', 'posmlp_b'):
        assert scheduled_epochs(parse_train_args(['-c', str(CONFIGS / f'{recipe}.yaml'), 'data'])) == 300
    assert scheduled_epochs(parse_train_args(['-c', str(CONFIGS / 'quickstart.yaml')])) == 8
