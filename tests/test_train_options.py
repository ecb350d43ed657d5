"""train.py's options as parsed: defaults, configs and the command line, and the values they refuse."""
import csv
import subprocess
import sys

import pytest
import torch
import yaml
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

from conftest import ROOT, TINY_MODEL_ARGS, make_image_folder, script_env

import train
from utils.amp import resolve_precision
from utils.args import parse_train_args, train_parser

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


def parse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit):
        parse_train_args(argv)
    return capsys.readouterr().err


@pytest.mark.parametrize('value', ['-1', '-0.5', 'nan'])
def test_negative_clip_grad_is_refused(capsys, value):
    message = parse_error(capsys, ['data', '--clip-grad', value])
    assert 'argument --clip-grad: must be ' in message and f'0 or more, not {value}; 0 turns clipping off' in message


def test_clip_grad_zero_or_none_turns_clipping_off(tmp_path):
    assert parse_train_args(['data', '--clip-grad', '0']).clip_grad == 0
    config = tmp_path / 'no_clip.yaml'
    config.write_text('clip_grad: null\n')
    assert parse_train_args(['-c', str(config), 'data']).clip_grad is None


@pytest.mark.parametrize('argv, message', [
    (['--opt-betas', '0.9'], '--opt adamw takes 2 betas, not 1 (0.9); give --opt-betas 2 numbers.'),
    (['--opt-betas', '0.9', '0.99', '0.999'], '--opt adamw takes 2 betas, not 3 (0.9 0.99 0.999)'),
    (['--opt', 'lookahead_adan', '--opt-betas', '0.9', '0.99'], '--opt lookahead_adan takes 3 betas, not 2'),
    (['--opt', 'sgd', '--opt-betas', '0.9', '0.99'], '--opt sgd takes no betas; leave --opt-betas out.'),
])
def test_opt_betas_must_match_the_optimizer(capsys, argv, message):
    assert message in parse_error(capsys, ['data', *argv])


def test_opt_betas_the_optimizer_takes_are_accepted():
    assert parse_train_args(['data', '--opt-betas', '0.9', '0.95']).opt_betas == [0.9, 0.95]
    assert parse_train_args(['data', '--opt', 'adan', '--opt-betas', '0.98', '0.92', '0.99']).opt_betas == [
        0.98, 0.92, 0.99]


@pytest.mark.parametrize('spelling', [['--local-rank=1'], ['--local_rank', '1']])
def test_the_local_rank_of_the_legacy_launcher_is_accepted(spelling):
    assert parse_train_args(['data', *spelling]).local_rank == 1


def test_the_legacy_launcher_runs_two_processes(tmp_path):
    """The authors' scripts used `python -m torch.distributed.launch`, which passes --local-rank to each process."""
    data = make_image_folder(tmp_path / 'data', per_class=4)
    env = script_env()
    command = [sys.executable, '-m', 'torch.distributed.launch', '--nproc_per_node=2',
               f'--master_port={env["MASTER_PORT"]}', str(ROOT / 'train.py'), str(data), *TINY_MODEL_ARGS,
               '--img-size', '32', '-b', '4', '-j', '0', '--threads', '1', '--epochs', '1', '--warmup-epochs', '0',
               '--max-steps-per-epoch', '1', '--output', str(tmp_path / 'out'), '--experiment', 'launch']
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'on cpu, 2 process(es)' in result.stdout
    assert (tmp_path / 'out' / 'launch' / 'last.pth.tar').is_file()


def on_off_options():
    """Each option a config turns on or off (true or false) and the command-line switches that set it: the on/off
    pairs, and --torchcompile [BACKEND] with --no-torchcompile."""
    switches = {}
    for action in train_parser()._actions:
        bare = action.nargs == 0 or (action.nargs == '?' and action.const is not None)
        if bare and action.dest != 'help':
            switches.setdefault(action.dest, []).extend(action.option_strings)
    return switches


@pytest.mark.parametrize('dest, switches', on_off_options().items())
@pytest.mark.parametrize('in_config', [True, False])
def test_the_command_line_undoes_each_on_off_option_of_a_config(tmp_path, dest, switches, in_config):
    config = tmp_path / 'config.yaml'
    # EMA on throughout, so that ranking by it can be switched on.
    config.write_text(yaml.safe_dump({'model_ema': True, dest: in_config}))
    values = {switch: getattr(parse_train_args(['-c', str(config), 'data', switch]), dest) for switch in switches}
    assert any(bool(value) is not in_config for value in values.values()), values


def test_the_recipe_with_ema_and_amp_turned_off():
    args = parse_train_args(['-c', str(CONFIGS / 'posmlp_t.yaml'), 'data', '--no-model-ema', '--no-amp'])
    assert args.model_ema is False and args.amp is False and args.lr == 2e-3


@pytest.mark.parametrize('argv, ranked_by_ema', [
    ([], False),
    (['--model-ema'], True),
    (['--model-ema', '--no-best-from-ema'], False),
    (['-c', str(CONFIGS / 'posmlp_t.yaml')], True),
    (['-c', str(CONFIGS / 'posmlp_t.yaml'), '--no-model-ema'], False),
    (['-c', str(CONFIGS / 'posmlp_t.yaml'), '--no-best-from-ema'], False),
])
def test_checkpoints_are_ranked_by_the_ema_model_when_there_is_one(argv, ranked_by_ema):
    assert parse_train_args([*argv, 'data']).best_from_ema is ranked_by_ema


def test_a_config_asking_for_ema_ranking_leaves_it_to_the_model_ema_switch(tmp_path, capsys):
    config = tmp_path / 'config.yaml'
    config.write_text('model_ema: true\nbest_from_ema: true\n')
    assert parse_train_args(['-c', str(config), 'data', '--no-model-ema']).best_from_ema is False
    config.write_text('model_ema: true\nbest_from_ema: false\n')
    assert parse_train_args(['-c', str(config), 'data']).best_from_ema is False
    message = '--best-from-ema ranks checkpoints by the EMA model, so it needs --model-ema.'
    assert message in parse_error(capsys, ['data', '--best-from-ema'])


def test_model_best_of_an_ema_run_is_the_ema_models(tmp_path, capsys, in_process_run):
    """model_best is what eval.sh measures: the EMA weights, so they must be what ranked it."""
    data = make_image_folder(tmp_path / 'data', per_class=2)
    assert train.main([str(data), *TINY_MODEL_ARGS, '-b', '2', '-j', '0', '--threads', '1', '--warmup-epochs', '0',
                       '--epochs', '1', '--model-ema', '--model-ema-decay', '0.5', '--output', str(tmp_path / 'out'),
                       '--experiment', 'ema']) == 0
    assert 'checkpoints ranked by EMA top1' in capsys.readouterr().out
    with open(tmp_path / 'out' / 'ema' / 'summary.csv', newline='') as f:
        row, = csv.DictReader(f)
    best = torch.load(tmp_path / 'out' / 'ema' / 'model_best.pth.tar', map_location='cpu', weights_only=True)
    assert best['metric'] == float(row['ema_top1'])


@pytest.mark.parametrize('recipe', ['posmlp_t', 'posmlp_s', 'posmlp_b'])
def test_recipes_crop_with_the_authors_aspect_ratios(recipe):
    assert parse_train_args(['-c', str(CONFIGS / f'{recipe}.yaml'), 'data']).ratio == [0.67, 1.5]


@pytest.mark.parametrize('device, argv, description', [
    ('cpu', [], 'native AMP (bfloat16)'),  # CPUs compute bfloat16 natively far more often than float16
    ('cuda', [], 'native AMP (float16)'),  # the authors' native AMP
    ('cpu', ['--amp-dtype', 'float16'], 'native AMP (float16)'),
])
def test_amp_type_defaults_to_the_devices(device, argv, description):
    args = parse_train_args(['data', '--amp', *argv])
    _, _, precision = resolve_precision(torch.device(device), amp=args.amp, amp_dtype=args.amp_dtype)
    assert precision.description == description
    assert (precision.loss_scaler is not None) == description.endswith('(float16)')


def test_a_device_that_is_not_one_is_named(tmp_path, caplog):
    assert train.main([str(tmp_path), '--device', 'foo', '--output', str(tmp_path / 'out')]) == 1
    assert 'Stopped: --device foo: not a device; give cpu, cuda or cuda:N.' in caplog.text
    assert 'Traceback' not in caplog.text and not (tmp_path / 'out').exists()
