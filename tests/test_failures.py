"""Failures a user can cause are one line each, never a traceback, and lose nothing: unwritable outputs, a
full disk, over-long names, bad configs and numbers, an unwritable results file; kill -9 leaves no debris
that outlives the next run; a bare --resume continues the run it names; --help states defaults truly."""
import argparse
import errno
import logging
import os
import re
import signal
import stat
import subprocess
import sys

import pytest
import timm
import torch

from conftest import ROOT, TINY_KWARGS, TINY_MODEL_ARGS, make_image_folder, refuse_under

import models
import train
import validate
from models.checkpoint import PROCESS_UMASK
from utils import outputs
from utils.args import parse_train_args, train_parser
from utils.digits import prepare_digits

pytestmark = pytest.mark.usefixtures('in_process_run')

FAST = ['-b', '4', '-j', '0', '--threads', '1', '--warmup-epochs', '0', '--cooldown-epochs', '0', '--log-interval', '1']


def train_in_process(data, out, experiment, *extra) -> int:
    return train.main([str(data), *TINY_MODEL_ARGS, *FAST, '--output', str(out), '--experiment', experiment, *extra])


def one_line_error(capsys, *expected) -> str:
    """The output so far names every `expected` text in one error line, without a traceback."""
    captured = capsys.readouterr()
    return error_line(captured.out + captured.err, *expected)


def error_line(text: str, *expected) -> str:
    errors = [line for line in text.splitlines() if 'ERROR' in line or 'error:' in line]
    assert len(errors) == 1, text[-3000:]
    assert all(part in errors[0] for part in expected), errors[0]
    assert 'Traceback' not in text and 'Logging error' not in text
    return errors[0]


def temporaries(folder):
    return sorted(p.name for p in folder.rglob('.tmp-*'))


# --- A full disk and unwritable folders ---------------------------------------------------------------------


class FillingFile:
    """A file on a disk that fills up: `room` more bytes (or characters) go in, then writes fail with ENOSPC."""

    def __init__(self, f, room: int):
        self.file, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            self.file.write(data[:self.room])
            self.room = 0
            self.file.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.file.close()


class FillingDisk:
    """os.fdopen (through which models.atomic_file writes every checkpoint, summary and args file) on a disk that
    fills up: the files opened after the first `whole_files` get `partial` bytes, then ENOSPC."""

    def __init__(self, whole_files: int, partial: int = 1000):
        self.whole_files, self.partial, self.opened = whole_files, partial, 0
        self.real_fdopen = os.fdopen

    def fdopen(self, fd, *args, **kwargs):
        self.opened += 1
        f = self.real_fdopen(fd, *args, **kwargs)
        return f if self.opened <= self.whole_files else FillingFile(f, self.partial)


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_last_checkpoints(tmp_path, capsys, monkeypatch):
    data = make_image_folder(tmp_path / 'data', per_class=2)
    run = tmp_path / 'out' / 'run'
    # args.yaml, summary.csv (its first row makes it), and epoch 0's checkpoint-0, model_best and last are written
    # whole; epoch 1's first file is not.
    monkeypatch.setattr(os, 'fdopen', FillingDisk(whole_files=5).fdopen)
    assert train_in_process(data, tmp_path / 'out', 'run', '--epochs', '2') == 1
    one_line_error(capsys, f'cannot write {run / "checkpoint-1.pth.tar"}: No space left on device',
                   'free space on that disk', f'--resume {run / "last.pth.tar"}')
    monkeypatch.undo()
    assert temporaries(run) == [] and not (run / 'checkpoint-1.pth.tar').exists()
    for name in ('last.pth.tar', 'model_best.pth.tar', 'checkpoint-0.pth.tar'):
        assert models.load_checkpoint_file(str(run / name))['epoch'] == 0

    # Once there is room again, the run goes on from its last checkpoint.
    assert train.main([*TINY_MODEL_ARGS, *FAST, '--resume', str(run / 'last.pth.tar'), '--epochs', '2']) == 0
    assert models.load_checkpoint_file(str(run / 'last.pth.tar'))['epoch'] == 1


def test_a_file_whose_temporary_cannot_be_made_is_named_itself(tmp_path, monkeypatch):
    refuse_under(monkeypatch, tmp_path)
    with pytest.raises(OSError) as error:
        models.save_checkpoint_file({}, str(tmp_path / 'last.pth.tar'))
    assert error.value.errno == errno.EROFS and error.value.filename == str(tmp_path / 'last.pth.tar')


def test_ctrl_c_during_a_save_is_one_line_and_leaves_the_checkpoints_whole(tmp_path, capsys, monkeypatch):
    data = make_image_folder(tmp_path / 'data', per_class=2)
    real_save, saves = torch.save, []

    def save(obj, f, *args, **kwargs):
        saves.append(obj['epoch'])
        if len(saves) == 4:  # epoch 1's first file, after epoch 0's checkpoint-0, model_best and last
            f.write(b'PK\x03\x04' + bytes(1000))
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, 'save', save)
    assert train_in_process(data, tmp_path / 'out', 'run', '--epochs', '2') == 130
    one_line_error(capsys, 'Stopped by Ctrl-C. The checkpoints written before are whole')
    run = tmp_path / 'out' / 'run'
    assert saves == [0, 0, 0, 1] and temporaries(run) == []
    assert models.load_checkpoint_file(str(run / 'last.pth.tar'))['epoch'] == 0


def test_a_log_line_that_cannot_be_written_stops_the_run_in_one_line(tmp_path, capsys, monkeypatch):
    data = make_image_folder(tmp_path / 'data', per_class=2)
    real_open = logging.FileHandler._open
    monkeypatch.setattr(logging.FileHandler, '_open', lambda handler: FillingFile(real_open(handler), 1000))
    assert train_in_process(data, tmp_path / 'out', 'run', '--epochs', '1') == 1
    one_line_error(capsys, f'cannot write {tmp_path / "out" / "run" / "train.log"}: No space left on device')


def test_a_summary_row_cut_by_a_full_disk_is_taken_back(tmp_path, monkeypatch):
    path = tmp_path / 'summary.csv'
    outputs.append_summary(str(path), {'epoch': 0, 'lr': 0.1, 'train_loss': 1.0})
    before = path.read_bytes()

    def full_open(file, mode='r', **kwargs):
        return FillingFile(open(file, mode, **kwargs), 5) if 'a' in mode else open(file, mode, **kwargs)

    monkeypatch.setattr(outputs, 'open', full_open, raising=False)
    with pytest.raises(OSError):
        outputs.append_summary(str(path), {'epoch': 1, 'lr': 0.1, 'train_loss': 0.5})
    assert path.read_bytes() == before


@pytest.mark.parametrize('code, fix', [(errno.EACCES, 'you may not write there'),
                                       (errno.EROFS, 'that file system is read-only')])
def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, capsys, monkeypatch, code, fix):
    data = make_image_folder(tmp_path / 'data', per_class=1)
    locked = tmp_path / 'locked'
    refuse_under(monkeypatch, locked, 'makedirs', code)
    assert train_in_process(data, locked, 'run', '--epochs', '1') == 1
    one_line_error(capsys, f'cannot write {locked / "run"}: {os.strerror(code)}; {fix}: point --output at')


def test_an_output_under_a_file_is_one_line(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', per_class=1)
    in_the_way = tmp_path / 'file'
    in_the_way.write_text('')
    assert train_in_process(data, in_the_way / 'out', 'run', '--epochs', '1') == 1
    one_line_error(capsys, f'cannot write {in_the_way / "out"}', 'a file is in the way of a folder')


def test_names_over_255_bytes_are_one_line(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', per_class=1)
    with pytest.raises(SystemExit):
        train_in_process(data, tmp_path / 'out', 'é' * 128, '--epochs', '1')
    one_line_error(capsys, 'argument --experiment: 256 bytes long, but a folder name may have at most 255')
    assert train_in_process(data, tmp_path / ('o' * 256), 'run', '--epochs', '1') == 1
    one_line_error(capsys, 'File name too long', 'at most 255 bytes')


# --- Debris of interrupted writes ---------------------------------------------------------------------------

KILLED_SAVE = '''
import os, signal, sys
import torch
sys.path.insert(0, sys.argv[1])
import models

def killed_while_saving(obj, f, *args, **kwargs):
    f.write(b'PK\\x03\\x04' + bytes(4096))
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = killed_while_saving
models.save_checkpoint_file({}, sys.argv[2])
'''


def killed_save(path):
    """Run models.save_checkpoint_file(path) in a process killed (-9) in the middle of writing."""
    result = subprocess.run([sys.executable, '-c', KILLED_SAVE, str(ROOT), str(path)], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr


def test_a_run_removes_the_temporary_files_of_writes_killed_in_its_folder_and_nothing_else(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', per_class=2)
    out = tmp_path / 'out'
    assert train_in_process(data, out, 'run', '--epochs', '1') == 0
    run = out / 'run'
    killed_save(run / 'last.pth.tar')
    killed_save(run / 'superseded' / 'checkpoint-3.pth.tar')
    (out / '.tmp-abcd1234-elsewhere.pth.tar').write_text('')  # outside the run folder: not the run's to remove
    (run / 'summary.csv.tmp').write_text('epoch\n')  # what earlier versions left
    keep = [run / '.tmp-notes.txt', run / 'notes.tmp', run / '.tmp-1234567.pth.tar']
    for path in keep:
        path.write_text('mine')
    debris = temporaries(run)
    assert len(debris) == 4 and len(temporaries(out)) == 5
    assert models.load_checkpoint_file(str(run / 'last.pth.tar'))['epoch'] == 0  # the killed save changed nothing

    capsys.readouterr()
    assert train_in_process(data, out, 'run', '--epochs', '2', '--resume', str(run / 'last.pth.tar')) == 0
    assert 'Removed 3 temporary file(s) that an interrupted write left' in capsys.readouterr().out
    assert temporaries(run) == ['.tmp-1234567.pth.tar', '.tmp-notes.txt']
    assert all(path.read_text() == 'mine' for path in keep) and len(temporaries(out)) == 3
    assert not (run / 'summary.csv.tmp').exists()


def test_temporary_files_are_no_run_and_a_new_run_clears_them(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', per_class=2)
    run = tmp_path / 'out' / 'run'
    run.mkdir(parents=True)
    (run / '.tmp-abcd1234-last.pth.tar').write_bytes(b'PK\x03\x04')  # what a killed save leaves
    assert train_in_process(data, tmp_path / 'out', 'run', '--epochs', '1') == 0
    assert temporaries(run) == [] and 'Removed 1 temporary file(s)' in capsys.readouterr().out


# --- Configs and numbers ------------------------------------------------------------------------------------


@pytest.mark.parametrize('content, message', [
    (b'lr: 0.1\nepochs: 3\xff\n', 'is not UTF-8 text (byte 0xff on line 2); save it as UTF-8'),
    (b'', 'is empty: it sets no options'),
    (b'# nothing but a comment\n', 'is empty: it sets no options'),
    (b'lr: 0.1\nepochs: 3\nlr: 0.2\n', "key 'lr' is given twice, on lines 1 and 3; keep one of them"),
    (b'model_kwargs:\n  gate: lrpe\n  gate: sgu\n', "key 'gate' is given twice, on lines 2 and 3"),
])
def test_a_config_that_sets_nothing_or_is_ambiguous_is_named(tmp_path, capsys, content, message):
    config = tmp_path / 'bad.yaml'
    config.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        parse_train_args(['-c', str(config), 'data'])
    assert exit_info.value.code == 2
    one_line_error(capsys, f'config {config}', message)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    config = tmp_path / 'merged.yaml'
    config.write_text('model_kwargs:\n  <<: {gate: lrpe, depths: [1, 1, 1, 1]}\n  gate: sgu\n')
    assert parse_train_args(['-c', str(config)]).model_kwargs == {'gate': 'sgu', 'depths': [1, 1, 1, 1]}


@pytest.mark.parametrize('option, message', [
    (['--img-size', '0'], 'argument --img-size: must be 1 or more, not 0'),
    (['--input-size', '3', '0', '32'], 'argument --input-size: must be 1 or more, not 0'),
    (['--lr', '-1'], 'argument --lr: must be 0 or more, not -1'),
    (['--lr', 'nan'], 'argument --lr: must be a finite number, 0 or more, not nan'),
    (['--drop', '1.5'], 'argument --drop: must be from 0 to 1, not 1.5'),
    (['--smoothing', '1'], 'argument --smoothing: must be from 0 to below 1, not 1'),
    (['--num-classes', '0'], 'argument --num-classes: must be 1 or more, not 0'),
    (['--interpolation', 'wobbly'], '--interpolation wobbly: not a resize filter; give one of nearest, bilinear'),
    (['--train-interpolation', 'cubic'], '--train-interpolation cubic: not a resize filter; give one of nearest'),
    (['--aa', 'autoaugment'], '--aa autoaugment: not an augmentation policy timm knows (Unknown AA policy'),
    (['--mean', '0.5', '0.5'], '--mean takes 1 value or 3 (one per image channel), not 2.'),
    (['--mean', 'nan', '0.5', '0.5'], 'argument --mean: must be a finite number, not nan'),
    (['--std', '1e-30'], 'argument --std: must be 0.001 or more, not 1e-30; the image is divided by it'),
    (['--seed', '-1'], 'argument --seed: must be from 0 to 2**32 - 1, not -1'),
    (['--remode', 'bogus'], "argument --remode: invalid choice: 'bogus' (choose from 'const', 'rand', 'pixel')"),
    (['--cutmix-minmax', '0.9', '0.1'], '--cutmix-minmax 0.9 0.1: give the smaller box ratio first'),
])
def test_bad_training_options_are_named_before_anything_runs(capsys, option, message):
    with pytest.raises(SystemExit):
        parse_train_args(['data', *option])
    one_line_error(capsys, message)


@pytest.mark.parametrize('option, message', [
    (['--crop-pct', '0'], 'argument --crop-pct: must be more than 0 and at most 1, not 0'),
    (['--crop-pct', '1e9'], 'argument --crop-pct: must be more than 0 and at most 1, not 1e9'),
    (['--std', '0.2', '0', '0.2'], 'argument --std: must be 0.001 or more, not 0'),
    (['--mean', 'inf'], 'argument --mean: must be a finite number, not inf'),
])
def test_bad_evaluation_numbers_are_named(capsys, option, message):
    with pytest.raises(SystemExit):
        validate.main(['data', '--checkpoint', 'x', *option])
    one_line_error(capsys, message)


# --- validate.py's results file -----------------------------------------------------------------------------


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model = timm.create_model('posmlp_t', num_classes=3, **TINY_KWARGS)
    path = tmp_path / 'tiny.pth.tar'
    models.save_checkpoint_file({'state_dict': model.state_dict(), 'model_name': 'posmlp_t',
                                 'model_kwargs': dict(TINY_KWARGS, num_classes=3)}, str(path))
    return path


def test_a_mean_for_other_channels_is_named(tmp_path, capsys, tiny_checkpoint):
    data = make_image_folder(tmp_path / 'data', per_class=1, splits=('val',))
    assert validate.main([str(data), '--checkpoint', str(tiny_checkpoint), '-j', '0', '--mean', '0.5', '0.5']) == 1
    one_line_error(capsys, 'the normalisation mean (0.5, 0.5) has 2 values, but the input has 3 channels')


def test_a_results_file_that_cannot_be_written_comes_after_the_results(tmp_path, capsys, tiny_checkpoint):
    data = make_image_folder(tmp_path / 'data', per_class=1, splits=('val',))
    in_the_way = tmp_path / 'file'
    in_the_way.write_text('')
    results = in_the_way / 'results.json'
    argv = [str(data), '--checkpoint', str(tiny_checkpoint), '-j', '0', '--results-file', str(results)]
    assert validate.main(argv) == 1
    out = capsys.readouterr().out
    assert '"top1"' in out and out.index('"top1"') < out.index('ERROR')
    error_line(out, f'cannot write {in_the_way}: File exists; a file is in the way of a folder: point --results-file',
               'The results are printed above.')


def test_a_results_file_is_replaced_whole_or_not_at_all(tmp_path, capsys, monkeypatch, tiny_checkpoint):
    data = make_image_folder(tmp_path / 'data', per_class=1, splits=('val',))
    results = tmp_path / 'results.csv'
    results.write_text('the results of an earlier run\n')
    monkeypatch.setattr(os, 'fdopen', FillingDisk(whole_files=0, partial=10).fdopen)
    argv = [str(data), '--checkpoint', str(tiny_checkpoint), '-j', '0', '--results-file', str(results)]
    assert validate.main(argv) == 1
    one_line_error(capsys, f'cannot write {results}: No space left on device')
    assert results.read_text() == 'the results of an earlier run\n' and temporaries(tmp_path) == []


# --- A bare --resume ----------------------------------------------------------------------------------------


def test_a_bare_resume_continues_the_run_as_recorded(tmp_path, monkeypatch, capsys):
    data = make_image_folder(tmp_path / 'data', per_class=2)
    assert train_in_process(data, tmp_path / 'out', 'run', '--epochs', '1', '--lr', '0.01', '--model-kwargs',
                            'gate=lrpe', '--smoothing', '0') == 0
    last = tmp_path / 'out' / 'run' / 'last.pth.tar'
    monkeypatch.chdir(tmp_path)  # nothing on the command line says where the data or the output are
    assert train.main(['--resume', str(last), '--epochs', '3', '--smoothing', '0.2']) == 0
    resumed = torch.load(last, weights_only=True)
    assert resumed['epoch'] == 2 and resumed['model_name'] == 'posmlp_t'
    architecture = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_KWARGS.items()}
    assert resumed['model_kwargs'] == dict(num_classes=3, drop_rate=0.02333, drop_path_rate=0.1, gate='lrpe',
                                           **architecture)
    assert resumed['args']['lr'] == 0.01 and resumed['args']['batch_size'] == 4  # as recorded
    assert resumed['args']['smoothing'] == 0.2 and resumed['args']['epochs'] == 3  # as given
    assert resumed['args']['data_dir'] == str(data) and not (tmp_path / 'output').exists()


# --- --help and the quickstart data -------------------------------------------------------------------------


def parsers():
    import avg_checkpoints, clean_checkpoint, export_hub, inference, onnx_export
    checkpoint = ['--checkpoint', 'x']
    return {
        'train.py': (train_parser(), []), 'validate.py': (validate.validate_parser(), checkpoint),
        'inference.py': (inference.inference_parser(), checkpoint),
        'clean_checkpoint.py': (clean_checkpoint.clean_parser(), checkpoint),
        'avg_checkpoints.py': (avg_checkpoints.avg_parser(), []),
        'export_hub.py': (export_hub.export_parser(), checkpoint + ['--output', 'y']),
        'onnx_export.py': (onnx_export.export_parser(), ['y.onnx']),
    }


@pytest.mark.parametrize('script', ['train.py', 'validate.py', 'inference.py', 'clean_checkpoint.py',
                                    'avg_checkpoints.py', 'export_hub.py', 'onnx_export.py'])
def test_help_states_each_default_once_and_truly(script):
    parser, required = parsers()[script]
    defaults = vars(parser.parse_args(required))
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        text = ' '.join(formatter._expand_help(action).split())
        assert len(re.findall(r'\bdefault\b', text, re.IGNORECASE)) <= 1, text
        if '%(default)' in formatter._get_help_string(action):  # the value, not words of the help
            assert action.default == defaults[action.dest], (action.option_strings, text, defaults[action.dest])


def test_the_digits_are_readable_like_other_outputs(tmp_path):
    root = prepare_digits(tmp_path / 'data' / 'digits')
    expected = 0o777 & ~PROCESS_UMASK
    for folder in (root, root / 'train', root / 'val' / '3'):
        assert stat.S_IMODE(folder.stat().st_mode) == expected, folder
    image = next((root / 'val' / '3').iterdir())
    assert stat.S_IMODE(image.stat().st_mode) == 0o666 & ~PROCESS_UMASK
