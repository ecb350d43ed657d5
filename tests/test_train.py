"""train.py and distributed_train.sh on CPU: tiny PosMLPs on generated image folders, a few steps each."""
import csv
import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import timm
import torch
import yaml
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler

from conftest import ROOT, TINY_KWARGS, TINY_MODEL_ARGS, make_image_folder, reference_path, script_env

import inference
import train
import validate
from models import CheckpointError
from utils import engine, outputs
from utils.args import parse_train_args
from utils.data import create_split_dataset, use_input_channels
from utils.distributed import Runtime
from utils.errors import OptionError
from utils.images import read_rgb
from utils.outputs import append_summary, claim_run_folder, run_folder_conflict, supersede_summary_rows
from utils.run_checkpoints import CheckpointKeeper, resume_training, training_state

FAST = ['-b', '4', '-j', '0', '--threads', '1', '--warmup-epochs', '0', '--cooldown-epochs', '0', '--log-interval', '1']
SUMMARY_COLUMNS = ['epoch', 'lr', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5']
EMA_COLUMNS = ['ema_loss', 'ema_top1', 'ema_top5']
# The two command lines of the authors' README, as users type them.
AUTHORS_COMMAND = (
    '--model posmlp_t -b 256 -j 8 --opt adamw --epochs 300 --sched cosine --apex-amp --img-size 224 '
    '--drop-path 0.1 --lr 2e-3 --weight-decay 0.05 --remode pixel --reprob 0.25 --aa rand-m9-mstd0.5-inc1 '
    '--smoothing 0.1 --mixup 0.8 --cutmix 1.0 --warmup-lr 1e-6 --warmup-epochs 20').split()
SHORT_COMMAND = ['--model', 'posmlp_s']


pytestmark = pytest.mark.usefixtures('in_process_run')


def run_script(args, cwd, timeout=240, env=None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env={**script_env(), **(env or {})}, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_summary(run_dir):
    with open(run_dir / 'summary.csv', newline='') as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def load_checkpoint(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def train_in_process(data, out, experiment, *extra) -> int:
    return train.main([str(data), *TINY_MODEL_ARGS, *FAST, '--output', str(out), '--experiment', experiment, *extra])


def test_two_epochs_write_the_run_folder_and_plain_checkpoints(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data')
    out = tmp_path / 'out'
    assert train_in_process(data, out, 'run', '--epochs', '2', '--model-ema', '--checkpoint-hist', '1') == 0
    run = out / 'run'
    assert {p.name for p in run.iterdir()} >= {'args.yaml', 'summary.csv', 'train.log', 'last.pth.tar',
                                              'model_best.pth.tar'}
    assert len(list(run.glob('checkpoint-*.pth.tar'))) == 1
    columns, rows = read_summary(run)
    assert columns == SUMMARY_COLUMNS + EMA_COLUMNS
    assert [int(r['epoch']) for r in rows] == [0, 1]

    last = load_checkpoint(run / 'last.pth.tar')
    assert last['epoch'] == 1 and last['version'] == 2 and last['model_name'] == 'posmlp_t'
    assert last['model_kwargs']['embed_dims'] == TINY_KWARGS['embed_dims'] and last['model_kwargs']['num_classes'] == 3
    assert isinstance(last['args'], dict) and last['args']['model_ema'] is True
    assert set(last) >= {'state_dict', 'state_dict_ema', 'optimizer', 'scheduler', 'scaler', 'metric'}
    assert not any(k.startswith('module.') for k in last['state_dict'])
    assert last['metric'] == float(rows[1]['ema_top1'])  # an EMA run is ranked by the EMA model
    assert last['class_to_idx'] == {'a': 0, 'b': 1, 'c': 2}  # validate.py labels a folder of fewer classes by it

    log = (run / 'train.log').read_text()
    assert 'Train: 1 [   4/4 (100%)]' in log and 'img/s' in log and 'eta' in log and 'data' in log
    assert 'Epoch 1 done' in log and 'ema loss' in log

    # args.yaml is a config that reproduces the run's options; the positional root comes back as data_dir.
    again = parse_train_args(['-c', str(run / 'args.yaml')])
    saved = yaml.safe_load((run / 'args.yaml').read_text())
    assert saved['data'] == saved['data_dir'] == str(data) and again.data is None
    run_records = ('config', 'data')
    assert {k: v for k, v in vars(again).items() if k not in run_records} == {
        k: v for k, v in saved.items() if k not in run_records}


def test_accumulation_bfloat16_and_channels_last_on_cpu(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data')
    assert train_in_process(data, tmp_path / 'out', 'options', '--epochs', '1', '--grad-accum-steps', '3',
                            '--amp', '--amp-dtype', 'bfloat16', '--channels-last', '--sched-on-updates',
                            '--model-ema', '--log-wandb') == 0
    out = capsys.readouterr().out
    assert 'native AMP (bfloat16)' in out and '4 steps and 2 updates each' in out
    assert ('Global batch 12 = 4 per process x 1 process(es) x 3 accumulated; lr 0.002 as given, not rescaled for '
            'the global batch.') in out
    assert '1024 for' not in out and '8 processes' not in out  # no recipe's numbers on a run of another
    assert out.count('WARNING') == 1 and 'wandb package is not installed' in out
    last = load_checkpoint(tmp_path / 'out' / 'options' / 'last.pth.tar')
    assert float(last['optimizer']['state'][0]['step']) == 2 and last['scaler'] is None


def test_config_sets_defaults_and_the_command_line_overrides_it(tmp_path):
    config = tmp_path / 'run.yaml'
    config.write_text('lr: 2e-3\nepochs: 7\ndrop-path: 0.2\nmodel_kwargs: {gate: lrpe, depths: [1, 1, 1, 1]}\n'
                      'model_ema: true\n')
    args = parse_train_args(['-c', str(config), 'somewhere', '--epochs', '3', '--model-kwargs', 'gate=sgu'])
    assert args.lr == 0.002 and args.drop_path == 0.2 and args.model_ema is True
    assert args.epochs == 3 and args.data_dir == 'somewhere'
    assert args.model_kwargs == {'gate': 'sgu', 'depths': [1, 1, 1, 1]}  # merged key by key
    assert args.batch_size == 128  # untouched default


def test_a_run_made_from_args_yaml_takes_the_new_data_root_and_does_not_resume(tmp_path, capsys):
    config = tmp_path / 'args.yaml'
    config.write_text('data: /old\ndata_dir: /old\nresume: /old/run/last.pth.tar\nepochs: 7\n')
    assert parse_train_args(['-c', str(config)]).data_dir == '/old'
    assert parse_train_args(['-c', str(config), '/new']).data_dir == '/new'
    again = parse_train_args(['-c', str(config), '--data-dir', '/new'])
    assert again.data_dir == '/new' and again.resume == '' and again.epochs == 7
    with pytest.raises(SystemExit):
        parse_train_args(['/one', '--data-dir', '/two'])
    assert 'the data root is given twice, as /one and as --data-dir /two' in capsys.readouterr().err
    # The two command-line spellings are compared with each other, not with the config's value.
    with pytest.raises(SystemExit):
        parse_train_args(['-c', str(config), '--data-dir', '/old', '/new'])
    assert 'the data root is given twice, as /new and as --data-dir /old' in capsys.readouterr().err


def test_a_hand_written_config_gives_the_data_root_and_warns_that_it_does_not_resume(tmp_path, capsys):
    config = tmp_path / 'mine.yaml'
    config.write_text('data: /datasets/imagenet\nresume: /runs/a/last.pth.tar\n')
    args = parse_train_args(['-c', str(config)])
    assert args.data_dir == '/datasets/imagenet' and args.resume == ''
    warning = capsys.readouterr().err
    assert f'warning: config {config} has resume: /runs/a/last.pth.tar, but configs do not resume runs' in warning
    assert 'give --resume /runs/a/last.pth.tar on the command line' in warning
    assert parse_train_args(['-c', str(config), '--resume', '/runs/a/last.pth.tar']).resume == '/runs/a/last.pth.tar'
    assert 'warning' not in capsys.readouterr().err

    config.write_text('data: /a\ndata_dir: /b\n')
    with pytest.raises(SystemExit):
        parse_train_args(['-c', str(config)])
    assert f'config {config} gives the data root twice, as data: /a and as data_dir: /b' in capsys.readouterr().err


@pytest.mark.parametrize('text, message', [
    ('learning_rate: 0.1\n', "unknown key 'learning_rate'; it is not an option of train.py"),
    ('lr: fast\n', "lr: 'fast' (read as --lr=fast): argument --lr: invalid float value: 'fast'"),
    ('amp: 1.0\n', "amp: 1.0 (read as --amp=1.0): argument --amp/--no-amp: ignored explicit argument '1.0'"),
    ('eval_metric: top3\n', "eval_metric: 'top3' (read as --eval-metric=top3): argument --eval-metric: invalid "
                            "choice: 'top3'"),
    ('input_size: 224\n', 'input_size: 224 (read as --input-size=224): argument --input-size: expected 3 arguments'),
    ('scale: 0.8\n', 'scale: 0.8 (read as --scale=0.8): argument --scale: expected 2 arguments'),
    ('batch_size: 64.0\n', "batch_size: 64.0 (read as --batch-size=64.0): argument -b/--batch-size: invalid int "
                           "value: '64.0'"),
    ('lr: true\n', 'lr: True (read as --lr): argument --lr: expected one argument'),
    ('lr: false\n', 'lr: False (read as --no-lr): unrecognized arguments: --no-lr'),
    ('lr: [0.1, 0.2]\n', 'lr: [0.1, 0.2] (read as --lr 0.1 0.2): more values than the option takes'),
    ('model_kwargs: 3\n', "model_kwargs: 3 (read as --model-kwargs=3): argument --model-kwargs: '3' is not KEY=VALUE"),
    ('log_interval: 0\n', 'log_interval: 0 (read as --log-interval=0): argument --log-interval: must be 1 or more, '
                          'not 0'),
])
def test_bad_config_is_named(tmp_path, capsys, text, message):
    """argparse parses a config's values as it parses the command line; the error names the file and the key."""
    config = tmp_path / 'bad.yaml'
    config.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        parse_train_args(['-c', str(config), 'data'])
    assert exit_info.value.code == 2
    error, = [line for line in capsys.readouterr().err.splitlines() if 'error:' in line]
    assert f'train.py: error: config {config}: {message}' in error


@pytest.mark.parametrize('option, message', [
    (['--log-interval', '0'], 'argument --log-interval: must be 1 or more, not 0'),
    (['-b', '0'], 'argument -b/--batch-size: must be 1 or more, not 0'),
    (['-j', '-1'], 'argument -j/--workers: must be 0 or more, not -1; 0 loads the data in the main process'),
    (['--max-bad-images', '-1'], 'argument --max-bad-images: must be 0 or more, not -1; 0 stops at the first '
                                 'unreadable image'),
])
def test_bad_numbers_are_named(capsys, option, message):
    with pytest.raises(SystemExit):
        parse_train_args(['data', *option])
    assert message in capsys.readouterr().err


def test_config_turns_torchcompile_on_with_true(tmp_path):
    config = tmp_path / 'compile.yaml'
    config.write_text('torchcompile: true\nlr: 1\n')
    args = parse_train_args(['-c', str(config)])
    assert args.torchcompile == 'inductor' and args.lr == 1.0 and isinstance(args.lr, float)
    config.write_text('torchcompile: false\n')
    assert parse_train_args(['-c', str(config)]).torchcompile is None


def test_missing_config_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_train_args(['-c', str(tmp_path / 'nope.yaml')])
    assert 'nope.yaml does not exist' in capsys.readouterr().err


@pytest.mark.parametrize('case, message', [
    ('missing', 'does not exist'),
    ('no_val', 'has no val/ (or validation/); found: train. Expected layout'),
    ('flat', 'has no train/ and val/ (or validation/); found: a, b'),
])
def test_bad_data_dir_is_named(tmp_path, capsys, case, message):
    data = tmp_path / 'data'
    if case == 'no_val':
        make_image_folder(data, per_class=1, splits=('train',))
    elif case == 'flat':
        make_image_folder(data, classes=('a', 'b'), per_class=1, splits=('.',))
    assert train_in_process(data, tmp_path / 'out', 'bad', '--epochs', '1') == 1
    out = capsys.readouterr().out
    assert message in out and 'Traceback' not in out


@pytest.mark.parametrize('flag', ['--resume', '--initial-checkpoint'])
def test_missing_checkpoint_is_named(tmp_path, capsys, flag):
    data = make_image_folder(tmp_path / 'data', per_class=2)
    missing = tmp_path / 'nowhere.pth.tar'
    assert train_in_process(data, tmp_path / 'out', 'x', '--epochs', '1', flag, str(missing)) == 1
    assert f"checkpoint '{missing}' does not exist" in capsys.readouterr().out
    if flag == '--resume':  # checked before the run folder and its train.log are made
        assert not (tmp_path / 'out').exists()


def test_resuming_the_authors_checkpoint_points_to_initial_checkpoint(tmp_path, capsys):
    authors = reference_path('gqpe_tiny_original_checkpoint.pth.tar')  # version 2, like this project's format
    data = make_image_folder(tmp_path / 'data', per_class=2)
    assert train_in_process(data, tmp_path / 'out', 'x', '--epochs', '1', '--resume', str(authors)) == 1
    out = capsys.readouterr().out
    assert 'is not a training checkpoint written by this project' in out and 'pass it as --initial-checkpoint' in out
    assert 'Traceback' not in out and not (tmp_path / 'out').exists()


def test_resuming_on_data_of_other_classes_is_refused_before_the_run_changes(tmp_path, capsys):
    base = make_image_folder(tmp_path / 'data', classes=('cat', 'dog'), per_class=2)
    other = make_image_folder(tmp_path / 'data4', classes=('apple', 'zebra'), per_class=2)
    out = tmp_path / 'out'
    assert train_in_process(base, out, 'base', '--epochs', '1') == 0
    run = out / 'base'
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.name != 'train.log'}
    capsys.readouterr()
    assert train_in_process(other, out, 'base', '--epochs', '2', '--resume', str(run / 'last.pth.tar')) == 1
    printed = capsys.readouterr().out
    assert (f'Stopped: --resume {run / "last.pth.tar"} was trained on the classes cat, dog, but {other} labels apple, '
            f'zebra: its head would go on under other names. Resume on the data it was trained on, or start a new run '
            f'from its weights with --initial-checkpoint {run / "last.pth.tar"} to fine-tune.') in printed
    assert 'Traceback' not in printed
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != 'train.log'} == files
    assert train_in_process(base, out, 'base', '--epochs', '2', '--resume', str(run / 'last.pth.tar')) == 0


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    same_second = datetime.datetime(2024, 5, 1, 12, 0, 0)
    monkeypatch.setattr(outputs, 'datetime', SimpleNamespace(datetime=SimpleNamespace(now=lambda: same_second)))
    args = parse_train_args(['data', '--output', str(tmp_path / 'sweep'), '--img-size', '32'])
    folders = [claim_run_folder(args) for _ in range(3)]
    first = tmp_path / 'sweep' / '20240501-120000-posmlp_t-32'
    assert folders == [str(first), f'{first}-1', f'{first}-2'] and all(os.path.isdir(f) for f in folders)
    # A named folder keeps its refusal instead of a suffix.
    (first / 'summary.csv').write_text('epoch\n0\n')
    named = parse_train_args(['data', '--output', str(tmp_path / 'sweep'), '--experiment', first.name])
    with pytest.raises(OptionError, match='already holds a run'):
        claim_run_folder(named)


def test_a_moved_run_resumes_in_its_folder_and_a_larger_epochs_extends_its_schedule(tmp_path, monkeypatch, capsys):
    data = make_image_folder(tmp_path / 'data', per_class=2)
    monkeypatch.chdir(tmp_path)
    assert train.main([str(data), *TINY_MODEL_ARGS, *FAST, '--epochs', '1', '--output', 'out',
                       '--experiment', 'run1']) == 0
    run = tmp_path / 'moved' / 'run1'
    run.parent.mkdir()
    os.rename(tmp_path / 'out' / 'run1', run)
    os.rmdir(tmp_path / 'out')
    (tmp_path / 'elsewhere').mkdir()
    monkeypatch.chdir(tmp_path / 'elsewhere')  # the relative --output of args.yaml names no folder here
    options = (run / 'args.yaml').read_bytes()
    resume = ['-c', str(run / 'args.yaml'), '--resume', str(run / 'last.pth.tar')]
    capsys.readouterr()

    assert train.main(resume) == 1  # the run's own --epochs 1 is done
    out = capsys.readouterr().out
    assert 'epoch 0 is finished, and the schedule of --epochs 1 ends with epoch 0' in out
    assert 'pass a larger --epochs' in out
    assert sorted(p.name for p in run.iterdir()) == ['args.yaml', 'checkpoint-0.pth.tar', 'last.pth.tar',
                                                     'model_best.pth.tar', 'summary.csv', 'train.log']

    assert train.main(resume + ['--epochs', '3', '--lr', '0.01']) == 0
    out = capsys.readouterr().out
    assert f'output in {run}' in out and '--lr 0.01 (was 0.002), --epochs 3 (was 1)' in out
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'elsewhere' / 'out').exists()
    _, rows = read_summary(run)
    assert [int(r['epoch']) for r in rows] == [0, 1, 2]
    # The cosine schedule of the new options (3 epochs from 0.01 to 1e-6), not the checkpoint's, at epochs 1 and 2.
    assert float(rows[1]['lr']) == pytest.approx(1e-6 + (0.01 - 1e-6) * 0.75)
    assert float(rows[2]['lr']) == pytest.approx(1e-6 + (0.01 - 1e-6) * 0.25)
    # The run's first options are kept; the resumed run's are written beside them.
    assert (run / 'args.yaml').read_bytes() == options
    assert yaml.safe_load((run / 'args-resume-epoch1.yaml').read_text())['epochs'] == 3


def test_unreadable_images_are_skipped_counted_and_bounded(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data')
    (data / 'train' / 'a' / 'a_0.png').write_bytes(b'not a png')
    assert train_in_process(data, tmp_path / 'out', 'one_bad', '--epochs', '1', '--max-bad-images', '1') == 0
    out = capsys.readouterr().out
    assert 'Skipped unreadable image' in out and 'a_0.png' in out
    assert '1 unreadable images skipped' in out

    (data / 'train' / 'b' / 'b_0.png').write_bytes(b'')
    assert train_in_process(data, tmp_path / 'out', 'two_bad', '--epochs', '1', '--max-bad-images', '1') == 1
    assert '2 images could not be read, more than the 1 allowed' in capsys.readouterr().out


def test_the_unreadable_image_check_is_not_counted_as_data_time(monkeypatch, caplog):
    clock = SimpleNamespace(now=0.)
    monkeypatch.setattr(engine, 'time', SimpleNamespace(time=lambda: clock.now))

    def slow_check(dataset, runtime):
        clock.now += 100.
    monkeypatch.setattr(engine, 'check_unreadable', slow_check)
    model = torch.nn.Linear(4, 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 4), torch.tensor([0, 1] * 2)),
                                         batch_size=2)
    caplog.set_level(logging.INFO, logger=engine.__name__)
    engine.train_one_epoch(0, model, loader, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                           Runtime(torch.device('cpu')), engine.TrainSettings(steps=2, log_interval=1))
    assert caplog.text.count('data 0.000s') == 2


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data')
    # Epoch 0 warms up at a sane lr; epoch 1 jumps to an absurd one and the loss overflows.
    code = train_in_process(data, tmp_path / 'out', 'nan', '--epochs', '3', '--warmup-epochs', '1',
                            '--warmup-lr', '1e-4', '--opt', 'sgd', '--lr', '1e30', '--clip-grad', '0',
                            '--mixup', '0', '--cutmix', '0')
    assert code == 1
    out = capsys.readouterr().out
    assert 'the loss became nan in epoch 1, at step 2 of 4' in out and 'lower --lr' in out
    last = load_checkpoint(tmp_path / 'out' / 'nan' / 'last.pth.tar')
    assert last['epoch'] == 0
    assert all(torch.isfinite(v).all() for v in last['state_dict'].values() if v.is_floating_point())


def test_initial_checkpoint_fine_tunes_with_a_new_head(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', per_class=2)
    assert train_in_process(data, tmp_path / 'out', 'three', '--epochs', '1') == 0
    source = tmp_path / 'out' / 'three' / 'last.pth.tar'
    two_classes = make_image_folder(tmp_path / 'data2', classes=('x', 'y'), per_class=2)
    assert train_in_process(two_classes, tmp_path / 'out', 'two', '--epochs', '1',
                            '--initial-checkpoint', str(source)) == 0
    assert '3-class head dropped' in capsys.readouterr().out
    tuned = load_checkpoint(tmp_path / 'out' / 'two' / 'last.pth.tar')
    assert tuned['state_dict']['head.weight'].shape[0] == 2


def test_a_run_refuses_a_folder_that_holds_another_run(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', per_class=2)
    out = tmp_path / 'out'
    run = out / 'run'
    assert train_in_process(data, out, 'run', '--epochs', '1') == 0
    assert train_in_process(data, out, 'other', '--epochs', '1') == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()

    assert train_in_process(data, out, 'run', '--epochs', '1') == 1
    message = capsys.readouterr().out
    assert f'{run} already holds a run (checkpoint-0.pth.tar, last.pth.tar, summary.csv)' in message
    assert f'pass --resume {run / "last.pth.tar"}' in message and 'pass another --experiment' in message
    # Resuming another run's checkpoint into the folder would mix the two runs.
    assert train_in_process(data, out, 'run', '--epochs', '2', '--resume', str(out / 'other' / 'last.pth.tar')) == 1
    assert f'{run} holds another run' in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_a_refused_folder_names_the_checkpoint_to_resume_from_or_that_there_is_none(tmp_path):
    (tmp_path / 'summary.csv').write_text('epoch,lr\n0,0.1\n')  # stopped in epoch 0 after its summary row
    message = run_folder_conflict(str(tmp_path), '')
    assert 'but no checkpoint to resume it from' in message and '--resume' not in message
    assert 'Move or rename that folder, or pass another --experiment' in message
    # last.pth.tar moved to superseded/: the latest epoch kept, by number (12 after 3).
    for epoch in (3, 12):
        (tmp_path / f'checkpoint-{epoch}.pth.tar').write_bytes(b'')
    assert f'pass --resume {tmp_path / "checkpoint-12.pth.tar"};' in run_folder_conflict(str(tmp_path), '')
    (tmp_path / 'last.pth.tar').write_bytes(b'')
    assert f'pass --resume {tmp_path / "last.pth.tar"};' in run_folder_conflict(str(tmp_path), '')


def _training_objects(seed):
    torch.manual_seed(seed)
    model = timm.create_model('posmlp_t', num_classes=3, **TINY_KWARGS)
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    scheduler, _ = create_scheduler_v2(optimizer, 'cosine', num_epochs=5, warmup_epochs=1, updates_per_epoch=2)
    return model, optimizer, scheduler, NativeScaler(device='cpu'), ModelEmaV3(model, decay=0.9)


@pytest.mark.filterwarnings('ignore:PlateauLRScheduler is deprecated')
def test_resume_restores_optimizer_scheduler_scaler_and_ema(tmp_path):
    model, optimizer, scheduler, scaler, ema = _training_objects(0)
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for _ in range(3):
        scaler(torch.nn.functional.cross_entropy(model(images), targets), optimizer, parameters=model.parameters())
        optimizer.zero_grad()
        ema.update(model)
    scheduler.step(1)
    keeper = CheckpointKeeper(str(tmp_path))
    keeper.save(training_state(0, 'posmlp_t', dict(TINY_KWARGS, num_classes=3), model, optimizer, scheduler,
                               scaler, ema, {'lr': 1e-3}, 50.0))

    fresh = _training_objects(1)
    fresh_scheduler = fresh[2]
    fresh_scheduler.t_initial = 9  # a run resumed with a larger --epochs
    assert resume_training(str(tmp_path / 'last.pth.tar'), *fresh) == 1
    for saved, restored in zip((model, optimizer, scaler, ema.module), fresh[:2] + (fresh[3], fresh[4].module)):
        assert str(restored.state_dict()) == str(saved.state_dict())
    assert torch.equal(fresh[0].head.weight, model.head.weight)
    assert fresh_scheduler.t_initial == 9  # the schedule follows the resumed run's options, not the checkpoint's

    # The plateau schedule's best metric is no option: it is restored.
    plateau, _ = create_scheduler_v2(optimizer, 'plateau', num_epochs=5, warmup_epochs=0)
    plateau.step(1, 42.)
    keeper.save(training_state(1, 'posmlp_t', dict(TINY_KWARGS, num_classes=3), model, optimizer, plateau,
                               scaler, ema, {'lr': 1e-3}, 50.0))
    fresh = _training_objects(2)
    fresh_plateau, _ = create_scheduler_v2(fresh[1], 'plateau', num_epochs=5, warmup_epochs=0)
    resume_training(str(tmp_path / 'last.pth.tar'), fresh[0], fresh[1], fresh_plateau, fresh[3], fresh[4])
    assert fresh_plateau.lr_scheduler.best == 42.


def test_resume_refuses_to_drop_ema_weights_and_warns_about_a_dropped_scaler(tmp_path, caplog):
    model, optimizer, scheduler, scaler, ema = _training_objects(0)
    CheckpointKeeper(str(tmp_path)).save(training_state(
        0, 'posmlp_t', dict(TINY_KWARGS, num_classes=3), model, optimizer, scheduler, scaler, ema, {}, 50.))
    model, optimizer, scheduler, _, ema = _training_objects(1)
    with pytest.raises(CheckpointError, match='holds EMA weights, but this run has no --model-ema') as error:
        resume_training(str(tmp_path / 'last.pth.tar'), model, optimizer, scheduler, None, None)
    assert f'-c {tmp_path / "args.yaml"}' in str(error.value)
    assert resume_training(str(tmp_path / 'last.pth.tar'), model, optimizer, scheduler, None, ema) == 1
    assert 'holds loss-scaler state' in caplog.text and 'Add --amp' in caplog.text


def test_resume_with_another_global_batch_says_so(tmp_path, caplog):
    # A run of 2 processes resumed on 1 halves its batch per update under the same learning rate.
    model, optimizer, scheduler, scaler, ema = _training_objects(0)
    CheckpointKeeper(str(tmp_path)).save(training_state(
        0, 'posmlp_t', dict(TINY_KWARGS, num_classes=3), model, optimizer, scheduler, scaler, ema, {}, 50.,
        global_batch=64))
    for batch, warned in ((64, False), (32, True)):
        caplog.clear()
        model, optimizer, scheduler, scaler, ema = _training_objects(1)
        assert resume_training(str(tmp_path / 'last.pth.tar'), model, optimizer, scheduler, scaler, ema, batch) == 1
        assert ('was trained with a global batch of 64 images per update, and this run has 32' in caplog.text) == warned


def test_summary_takes_new_columns_by_rewriting_the_file(tmp_path):
    path = tmp_path / 'summary.csv'
    append_summary(str(path), {'epoch': 0, 'eval_top1': 50.})
    append_summary(str(path), {'epoch': 1, 'eval_top1': 60., 'ema_top1': 55.})  # EMA turned on at resume
    append_summary(str(path), {'epoch': 2, 'eval_top1': 70.})
    assert path.read_text().splitlines() == ['epoch,eval_top1,ema_top1', '0,50.0,', '1,60.0,55.0', '2,70.0,']
    assert [p.name for p in tmp_path.iterdir()] == ['summary.csv']


def test_resume_keeps_the_summary_rows_it_redoes_in_superseded(tmp_path, monkeypatch, caplog):
    path = tmp_path / 'summary.csv'
    for epoch in range(4):
        append_summary(str(path), {'epoch': epoch, 'eval_top1': 10. * epoch})
    whole = path.read_bytes()
    supersede_summary_rows(str(path), 4)  # no row of a redone epoch: nothing to keep aside
    assert path.read_bytes() == whole and not (tmp_path / 'superseded').exists()

    # The trimmed file replaces the old one by a rename only, so a failure leaves the old one whole.
    real_replace = os.replace

    def replace_all_but_the_summary(source, target):
        if target == str(path):
            raise OSError('disk full')
        real_replace(source, target)
    monkeypatch.setattr(os, 'replace', replace_all_but_the_summary)
    with pytest.raises(OSError):
        supersede_summary_rows(str(path), 2)
    monkeypatch.undo()
    assert path.read_bytes() == whole

    supersede_summary_rows(str(path), 2)
    assert [int(r['epoch']) for r in read_summary(tmp_path)[1]] == [0, 1]
    superseded = tmp_path / 'superseded'
    assert (superseded / 'summary.csv').read_bytes() == whole
    assert '2 summary.csv row(s) of the epochs it redoes were dropped; the whole old file is kept as' in caplog.text
    # A second rewind keeps the first one's copy (the failed attempt's copy is there too).
    append_summary(str(path), {'epoch': 2, 'eval_top1': 50.})
    supersede_summary_rows(str(path), 1)
    assert [int(r['epoch']) for r in read_summary(tmp_path)[1]] == [0]
    assert sorted(p.name for p in superseded.iterdir()) == ['summary-2.csv', 'summary-3.csv', 'summary.csv']
    assert (superseded / 'summary-3.csv').read_text().splitlines()[1:] == ['0,0.0', '1,10.0', '2,50.0']
    assert not list(tmp_path.rglob('*.tmp'))


def test_keeper_ranks_history_and_survives_a_failed_write(tmp_path, monkeypatch):
    model, optimizer, scheduler, scaler, ema = _training_objects(0)
    keeper = CheckpointKeeper(str(tmp_path), history=2)
    for epoch, metric in enumerate([10., 30., 20., 5.]):
        keeper.save(training_state(epoch, 'posmlp_t', {}, model, optimizer, scheduler, None, None, {}, metric))
    assert sorted(p.name for p in tmp_path.glob('checkpoint-*')) == ['checkpoint-1.pth.tar', 'checkpoint-2.pth.tar']
    # --torchcompile wraps the model; its weights are saved under their own names (compiling runs nothing).
    compiled = training_state(0, 'posmlp_t', {}, torch.compile(model, backend='eager'), optimizer, None, None,
                              None, {}, None)
    assert compiled['state_dict'].keys() == model.state_dict().keys()
    assert load_checkpoint(tmp_path / 'model_best.pth.tar')['epoch'] == 1 and keeper.best == (30., 1)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b'half a checkpoint')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError):
        keeper.save(training_state(4, 'posmlp_t', {}, model, optimizer, scheduler, None, None, {}, 1.))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / 'last.pth.tar')['epoch'] == 3
    assert not list(tmp_path.glob('.tmp-*'))

    restored = CheckpointKeeper(str(tmp_path), history=2)
    restored.restore(3)
    assert restored.best == (30., 1) and restored.kept == [(30., 1), (20., 2)]


def test_restore_moves_the_files_of_later_epochs_aside_and_remakes_model_best(tmp_path, monkeypatch, caplog):
    model, optimizer, scheduler, _, _ = _training_objects(0)

    def run_epochs(keeper, metrics, first=0):
        for epoch, metric in enumerate(metrics, first):
            keeper.save(training_state(epoch, 'posmlp_t', {}, model, optimizer, scheduler, None, None, {}, metric))

    run_epochs(CheckpointKeeper(str(tmp_path), history=4), [10., 30., 20., 40., 5.])
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, 'load', lambda *a, **kw: loads.append(kw.get('mmap')) or real_load(*a, **kw))
    keeper = CheckpointKeeper(str(tmp_path), history=4)
    keeper.restore(1)  # --resume checkpoint-1.pth.tar: epochs 2 to 4 are redone
    assert loads and all(loads)  # metrics and epochs are read from mapped files
    monkeypatch.undo()

    superseded = tmp_path / 'superseded'
    assert sorted(p.name for p in tmp_path.glob('*.pth.tar')) == ['checkpoint-0.pth.tar', 'checkpoint-1.pth.tar',
                                                                  'model_best.pth.tar']
    assert sorted(p.name for p in superseded.iterdir()) == ['checkpoint-2.pth.tar', 'checkpoint-3.pth.tar',
                                                            'last.pth.tar', 'model_best.pth.tar']
    assert load_checkpoint(superseded / 'model_best.pth.tar')['epoch'] == 3
    assert load_checkpoint(superseded / 'last.pth.tar')['epoch'] == 4
    assert load_checkpoint(tmp_path / 'model_best.pth.tar')['epoch'] == 1
    assert keeper.best == (30., 1) and keeper.kept == [(30., 1), (10., 0)]
    assert f'moved to {superseded}/: checkpoint-2.pth.tar, checkpoint-3.pth.tar, model_best' in caplog.text
    assert 're-created from' in caplog.text

    # A second rewind over the same epochs keeps the first one's files too.
    run_epochs(keeper, [50.], first=2)
    CheckpointKeeper(str(tmp_path), history=4).restore(1)
    assert 'checkpoint-2.pth.tar (as checkpoint-2-2.pth.tar)' in caplog.text
    assert {'checkpoint-2-2.pth.tar', 'model_best-2.pth.tar', 'last-2.pth.tar'} <= {p.name for p in superseded.iterdir()}
    assert load_checkpoint(superseded / 'model_best-2.pth.tar')['metric'] == 50.


def test_resuming_from_an_earlier_epoch_sets_its_later_files_and_rows_aside(tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=2)
    out, run = tmp_path / 'out', tmp_path / 'out' / 'rewind'
    assert train_in_process(data, out, 'rewind', '--epochs', '2', '--checkpoint-hist', '2') == 0
    first_summary = (run / 'summary.csv').read_bytes()
    assert train_in_process(data, out, 'rewind', '--epochs', '2', '--checkpoint-hist', '2',
                            '--resume', str(run / 'checkpoint-0.pth.tar')) == 0
    superseded = run / 'superseded'
    assert {'checkpoint-1.pth.tar', 'last.pth.tar', 'summary.csv'} <= {p.name for p in superseded.iterdir()}
    assert (superseded / 'summary.csv').read_bytes() == first_summary
    assert [int(r['epoch']) for r in read_summary(run)[1]] == [0, 1]


def test_killed_run_resumes_where_its_last_checkpoint_left_off(tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=12)
    command = [sys.executable, str(ROOT / 'train.py'), str(data), *TINY_MODEL_ARGS, *FAST, '--epochs', '4',
               '--model-ema', '--output', str(tmp_path / 'out'), '--experiment', 'killed']
    run = tmp_path / 'out' / 'killed'
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run / 'last.pth.tar').exists() and time.time() < deadline and process.poll() is None:
            time.sleep(0.02)
        assert process.poll() is None, 'the run ended before it could be killed'
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    finished = load_checkpoint(run / 'last.pth.tar')['epoch']
    assert finished < 3

    result = subprocess.run(command + ['--resume', str(run / 'last.pth.tar')], cwd=tmp_path,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f'continuing with epoch {finished + 1}' in result.stdout
    _, rows = read_summary(run)
    assert [int(r['epoch']) for r in rows] == [0, 1, 2, 3]
    last = load_checkpoint(run / 'last.pth.tar')
    assert last['epoch'] == 3
    updates_per_epoch = 3 * 12 // 4
    # The optimizer's step count carried over the kill: every update of the 4 epochs is in it.
    assert float(last['optimizer']['state'][0]['step']) == 4 * updates_per_epoch


def test_authors_command_line_runs_on_two_processes(tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=8)
    overrides = ['-b', '4', '-j', '0', '--threads', '1', '--img-size', '32', *TINY_MODEL_ARGS, '--epochs', '1',
                 '--cooldown-epochs', '0', '--max-steps-per-epoch', '2', '--model-ema', '--model-ema-decay', '0.5',
                 '--output', str(tmp_path / 'out'), '--experiment', 'authors']
    result = run_script(['bash', str(ROOT / 'distributed_train.sh'), '2', str(data), *AUTHORS_COMMAND, *overrides],
                        cwd=tmp_path)
    assert 'on cpu, 2 process(es)' in result.stdout
    assert 'Global batch 8 = 4 per process x 2 process(es) x 1 accumulated' in result.stdout
    assert (result.stdout + result.stderr).count('--apex-amp: NVIDIA apex is not installed') == 1
    assert 'Train: 0 [   2/2 (100%)]' in result.stdout
    _, rows = read_summary(tmp_path / 'out' / 'authors')
    assert len(rows) == 1
    saved = load_checkpoint(tmp_path / 'out' / 'authors' / 'last.pth.tar')
    args = saved['args']
    assert saved['global_batch'] == 8
    assert args['mixup'] == 0.8 and args['aa'] == 'rand-m9-mstd0.5-inc1' and args['apex_amp'] is True

    # Each process's EMA has BatchNorm statistics of its own data; only if they are synced before the EMA
    # is scored do the two processes score one model, the one saved. eval.sh scores that saved model as training
    # did: on two processes (each sees the batches it saw in training), unfused, under the same autocast
    # (--apex-amp fell back to native AMP, bfloat16 on the CPU), since bfloat16 rounds a fused model, and a
    # sample on some CPUs, differently.
    results = tmp_path / 'ema.json'
    run_script(['bash', str(ROOT / 'eval.sh'), str(data), str(tmp_path / 'out' / 'authors' / 'last.pth.tar'),
                '--use-ema', '--no-reparam', '-b', '4', '-j', '0', '--amp', '--results-file', str(results)],
               cwd=tmp_path, env={'NUM_PROC': '2'})
    measured = json.loads(results.read_text())['results'][0]
    assert float(rows[0]['ema_top1']) == pytest.approx(measured['top1'])
    # Unsynced, the two differ by about 1e-4 here; synced, by float32 rounding (about 1e-8).
    assert float(rows[0]['ema_loss']) == pytest.approx(measured['loss'], rel=1e-6)


def test_short_command_line_runs(tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=2)
    overrides = [*TINY_MODEL_ARGS, *FAST, '--epochs', '1', '--max-steps-per-epoch', '1',
                 '--output', str(tmp_path / 'out'), '--experiment', 'short']
    result = run_script(['bash', str(ROOT / 'distributed_train.sh'), '1', str(data), *SHORT_COMMAND, *overrides],
                        cwd=tmp_path)
    assert 'Model posmlp_s' in result.stdout and 'configs/posmlp_s.yaml holds the recipe for posmlp_s' in result.stdout
    assert load_checkpoint(tmp_path / 'out' / 'short' / 'last.pth.tar')['model_name'] == 'posmlp_s'


def test_a_one_channel_model_trains_and_evaluates_on_grey_images_of_rgb_folders(tmp_path, capsys):
    """As timm's input_img_mode: images are read as grey (luma) for 1 input channel; the model's RGB mean and std
    become their averages, in the workers' normalisation as in the prefetcher's."""
    data = make_image_folder(tmp_path / 'data', per_class=2)
    assert train_in_process(data, tmp_path / 'out', 'grey', '--epochs', '1', '--in-chans', '1') == 0
    assert "'input_size': (1, 32, 32)" in capsys.readouterr().out
    checkpoint = str(tmp_path / 'out' / 'grey' / 'last.pth.tar')
    assert validate.main([str(data), '--checkpoint', checkpoint, '-j', '0']) == 0
    assert inference.main([str(data / 'val'), '--checkpoint', checkpoint, '-j', '0', '--results-dir',
                           str(tmp_path / 'predictions')]) == 0
    dataset = create_split_dataset('', str(data / 'val'), 'validation')
    use_input_channels(dataset, 1)
    image, _ = dataset[0]
    grey = read_rgb(dataset.reader.samples[0][0]).convert('L')
    assert image.mode == 'L' and image.tobytes() == grey.tobytes()
    with pytest.raises(OptionError, match='the input has 4 channels, but images are read as RGB'):
        use_input_channels(dataset, 4)


@pytest.mark.parametrize('warmup, warned', [('1', True), ('0', False)])
def test_a_run_no_longer_than_its_warmup_is_warned_of(tmp_path, warmup, warned):
    # timm's default 10 warm-up epochs keep a short trial run at --warmup-lr throughout: chance accuracy.
    data = make_image_folder(tmp_path / 'data', per_class=2)
    assert train_in_process(data, tmp_path / 'out', 'short', '--epochs', '1', '--max-steps-per-epoch', '1',
                            '--warmup-epochs', warmup) == 0
    log = (tmp_path / 'out' / 'short' / 'train.log').read_text()
    assert ('--warmup-epochs 1 is not shorter than --epochs 1: the learning rate never leaves its warm-up' in log) \
        == warned


def test_torchcompile_compiles_the_ema_model_for_its_evaluation_too(tmp_path, monkeypatch):
    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda module, **kwargs: compiled.append(module) or real_compile(module,
                                                                                                        **kwargs))
    data = make_image_folder(tmp_path / 'data', per_class=2)
    assert train_in_process(data, tmp_path / 'out', 'compiled', '--epochs', '1', '--max-steps-per-epoch', '1',
                            '--model-ema', '--torchcompile', 'eager') == 0
    assert len(compiled) == 2 and compiled[0] is not compiled[1]
    _, rows = read_summary(tmp_path / 'out' / 'compiled')
    assert rows[0]['ema_top1'] != ''


def test_a_model_that_cannot_be_built_is_one_sentence(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', per_class=1)
    assert train_in_process(data, tmp_path / 'out', 'bad', '--epochs', '1', '--model-kwargs', 'gate=nope') == 1
    line, = [line for line in capsys.readouterr().out.splitlines() if 'ERROR' in line]
    assert "gate='nope' is not one of ('gqpe', 'lrpe', 'sgu'). Check --model-kwargs" in line and '..' not in line
