"""Weights files: the loader's safetensors reading and writing, clean_checkpoint.py and avg_checkpoints.py."""
import errno
import hashlib
import json
import os
import shutil

import pytest
import safetensors.torch
import timm
import torch

from conftest import TINY_KWARGS, refuse_under
from tool_helpers import CLASS_TO_IDX, INPUT_ARGS, logits, write_checkpoint

import avg_checkpoints
import clean_checkpoint
import models
from models import CheckpointError

pytestmark = pytest.mark.usefixtures('in_process_run')
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def timm_pretrained(path, num_classes=3):
    """The model through timm's pretrained route, as a user outside this project's loader would build it."""
    return timm.create_model('posmlp_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(path),
                             num_classes=num_classes), **TINY_KWARGS)


def model_of(state_dict):
    model = timm.create_model('posmlp_t', num_classes=3, **TINY_KWARGS)
    model.load_state_dict(state_dict)
    return model


def test_timm_dropping_a_head_that_fits_is_a_warning(tmp_path, caplog):
    # timm replaces the file's head by a random one when pretrained_cfg's class count is not the model's,
    # whatever the file's head is; the project's filters say so where a notebook shows it.
    path = tmp_path / 'run.pth.tar'
    write_checkpoint(path)
    with caplog.at_level('WARNING'):
        dropped = timm.create_model('posmlp_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                    num_classes=3, **TINY_KWARGS).eval()
    warning, = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    assert "3-class head fits the model, but timm drops it" in warning and 'num_classes=3 in pretrained_cfg' in warning
    caplog.clear()
    with caplog.at_level('WARNING'):
        kept = timm_pretrained(path).eval()
    assert not [r for r in caplog.records if r.levelname == 'WARNING']
    assert not torch.equal(dropped.head.weight, kept.head.weight)


# --- the loader: .safetensors files ---------------------------------------------------------------------

def test_a_safetensors_checkpoint_keeps_its_plain_data_and_rebuilds_its_model(tmp_path):
    saved = write_checkpoint(tmp_path / 'run.pth.tar')
    content = {k: saved[k] for k in ('model_name', 'model_kwargs', 'class_to_idx', 'epoch')}
    content.update(state_dict=saved['state_dict'], args=INPUT_ARGS)
    models.save_checkpoint_file(content, str(tmp_path / 'w.safetensors'))

    read = models.load_checkpoint_file(str(tmp_path / 'w.safetensors'))
    assert set(read) == set(content)
    assert all(torch.equal(read['state_dict'][k], v) for k, v in saved['state_dict'].items())
    assert read['class_to_idx'] == CLASS_TO_IDX and read['model_name'] == 'posmlp_t' and read['epoch'] == 0
    loaded = models.read_checkpoint(str(tmp_path / 'w.safetensors'))
    assert loaded.class_to_idx == CLASS_TO_IDX and loaded.weights == 'state_dict'
    model = models.create_model_from_checkpoint(loaded)
    assert torch.equal(logits(model, IMAGES), logits(model_of(saved['state_dict']), IMAGES))
    assert model.pretrained_cfg['input_size'] == (3, 32, 32) and model.pretrained_cfg['crop_pct'] == 1.0
    assert model.pretrained_cfg['num_classes'] == model.num_classes == 3  # not the default cfg's 1000
    # A bare state dict is written as the tensors alone.
    models.save_checkpoint_file(saved['state_dict'], str(tmp_path / 'bare.safetensors'))
    assert set(safetensors.torch.load_file(str(tmp_path / 'bare.safetensors'))) == set(saved['state_dict'])


def test_a_safetensors_file_holds_one_state_dict_and_plain_data_or_is_not_written(tmp_path):
    saved = write_checkpoint(tmp_path / 'run.pth.tar')
    for content in (saved, dict(state_dict=saved['state_dict'], extra=torch.zeros(1)), [1, 2]):
        with pytest.raises(CheckpointError, match='one state dict and plain data|holds a state dict'):
            models.save_checkpoint_file(content, str(tmp_path / 'w.safetensors'))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['run.pth.tar']


def test_damaged_or_altered_safetensors_files_are_named(tmp_path):
    state_dict = {'w': torch.ones(4)}
    whole = safetensors.torch.save(state_dict, metadata={'checkpoint': json.dumps({'model_name': 'posmlp_t'})})
    (tmp_path / 'cut.safetensors').write_bytes(whole[:-3])
    with pytest.raises(CheckpointError, match='not a readable safetensors file .*truncated'):
        models.load_checkpoint_file(str(tmp_path / 'cut.safetensors'))
    (tmp_path / 'bad.safetensors').write_bytes(safetensors.torch.save(state_dict, metadata={'checkpoint': '{oops'}))
    with pytest.raises(CheckpointError, match='is not JSON'):
        models.load_checkpoint_file(str(tmp_path / 'bad.safetensors'))
    deep = '{"args":' + '[' * 100000 + ']' * 100000 + '}'
    (tmp_path / 'deep.safetensors').write_bytes(safetensors.torch.save(state_dict, metadata={'checkpoint': deep}))
    with pytest.raises(CheckpointError, match='deep.safetensors.*nested too deeply to read; the file was altered'):
        models.load_checkpoint_file(str(tmp_path / 'deep.safetensors'))
    # Plain data cannot pose as weights: only the file's tensors are.
    claim = json.dumps({'state_dict_ema': {'w': [0, 0, 0, 0]}, 'model_name': 'posmlp_t'})
    (tmp_path / 'claim.safetensors').write_bytes(safetensors.torch.save(state_dict, metadata={'checkpoint': claim}))
    loaded = models.read_checkpoint(str(tmp_path / 'claim.safetensors'))
    assert loaded.weights == 'state_dict' and torch.equal(loaded.state_dict['w'], torch.ones(4))


# --- clean_checkpoint.py --------------------------------------------------------------------------------

@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_clean_keeps_the_ema_weights_and_what_rebuilds_the_model_under_a_hashed_name(tmp_path, monkeypatch, suffix):
    saved = write_checkpoint(tmp_path / 'model_best.pth.tar', epoch=4)
    monkeypatch.chdir(tmp_path)
    extra = ['--safetensors'] if suffix == '.safetensors' else []
    assert clean_checkpoint.main(['--checkpoint', 'model_best.pth.tar', *extra]) == 0
    written = [p for p in tmp_path.iterdir() if p.name.endswith(suffix)]
    assert len(written) == 1 and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('.')) == []
    sha256 = hashlib.sha256(written[0].read_bytes()).hexdigest()
    assert written[0].name == f'model_best-{sha256[:8]}{suffix}'

    content = models.load_checkpoint_file(str(written[0]))
    assert set(content) == {'state_dict', 'model_name', 'model_kwargs', 'class_to_idx', 'args', 'epoch'}
    assert json.dumps(content['args']) == json.dumps(INPUT_ARGS) and content['epoch'] == 4
    expected = logits(model_of(saved['state_dict_ema']), IMAGES)
    assert not torch.equal(expected, logits(model_of(saved['state_dict']), IMAGES))
    rebuilt = models.create_model_from_checkpoint(str(written[0]))
    assert torch.equal(logits(rebuilt, IMAGES), expected)
    assert rebuilt.pretrained_cfg['input_size'] == (3, 32, 32) and rebuilt.pretrained_cfg['interpolation'] == 'bilinear'
    assert torch.equal(logits(timm_pretrained(written[0]), IMAGES), expected)


def test_clean_no_use_ema_takes_the_live_weights_and_an_output_name(tmp_path):
    saved = write_checkpoint(tmp_path / 'last.pth.tar')
    out = tmp_path / 'release' / 'tiny.pth'
    assert clean_checkpoint.main(['--checkpoint', str(tmp_path / 'last.pth.tar'), '--no-use-ema', '--no-hash',
                                  '--output', str(out)]) == 0
    assert torch.equal(logits(models.create_model_from_checkpoint(str(out)), IMAGES),
                       logits(model_of(saved['state_dict']), IMAGES))
    # A folder as --output takes the checkpoint's name.
    assert clean_checkpoint.main(['--checkpoint', str(tmp_path / 'last.pth.tar'), '--output', str(out.parent)]) == 0
    assert [p.name.startswith('last-') and p.suffix == '.pth' for p in out.parent.iterdir() if p != out] == [True]


def test_clean_refuses_what_would_overwrite_or_misname_a_file(tmp_path, capsys):
    write_checkpoint(tmp_path / 'last.pth.tar')
    out = tmp_path / 'tiny.pth'
    base = ['--checkpoint', str(tmp_path / 'last.pth.tar'), '--no-hash']
    assert clean_checkpoint.main([*base, '--output', str(out)]) == 0
    assert clean_checkpoint.main([*base, '--output', str(out)]) == 1
    assert 'already exists; remove it or choose another --output' in capsys.readouterr().out
    assert clean_checkpoint.main([*base, '--output', str(tmp_path / 'x.pth'), '--safetensors']) == 1
    assert 'name it so, or leave the ending out' in capsys.readouterr().out
    assert clean_checkpoint.main(['--checkpoint', str(tmp_path / 'missing.pth.tar')]) == 1
    assert 'does not exist' in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last.pth.tar', 'tiny.pth']


def test_clean_aux_bn_drops_split_batchnorm_weights(tmp_path):
    saved = write_checkpoint(tmp_path / 'last.pth.tar', ema=False)
    aux = {f'stem.norm1.aux_bn.0.{k}': v for k, v in saved['state_dict'].items() if k.startswith('stem.norm1.')}
    models.save_checkpoint_file(dict(saved, state_dict=dict(saved['state_dict'], **aux)), str(tmp_path / 'split.pth'))
    assert clean_checkpoint.main(['--checkpoint', str(tmp_path / 'split.pth'), '--clean-aux-bn', '--no-hash',
                                  '--output', str(tmp_path / 'clean.pth')]) == 0
    assert set(models.load_checkpoint_file(str(tmp_path / 'clean.pth'))['state_dict']) == set(saved['state_dict'])


# --- avg_checkpoints.py ---------------------------------------------------------------------------------

def write_run(folder, metrics, eval_metric='top1', ema=True):
    """checkpoint-N.pth.tar per epoch, model_best.pth.tar and last.pth.tar copies, as train.py leaves them."""
    folder.mkdir(parents=True, exist_ok=True)
    states = {}
    for epoch, metric in enumerate(metrics):
        states[epoch] = write_checkpoint(folder / f'checkpoint-{epoch}.pth.tar', epoch, metric, seed=epoch, ema=ema,
                                         eval_metric=eval_metric)
    best = (min if eval_metric == 'loss' else max)(states, key=lambda e: metrics[e])
    shutil.copy(folder / f'checkpoint-{best}.pth.tar', folder / 'model_best.pth.tar')
    shutil.copy(folder / f'checkpoint-{len(metrics) - 1}.pth.tar', folder / 'last.pth.tar')
    return states


def mean_of(states, epochs, key='state_dict_ema'):
    return {k: torch.stack([states[e][key][k].double() for e in epochs]).mean(0).to(v.dtype)
            if v.is_floating_point() else states[epochs[0]][key][k] for k, v in states[epochs[0]][key].items()}


@pytest.mark.parametrize('eval_metric, metrics, best', [('top1', [10., 40., 30., 20.], [1, 2]),
                                                        ('loss', [1.0, 0.2, 0.9, 0.5], [1, 3])])
def test_avg_averages_the_n_best_counting_copies_of_an_epoch_once(tmp_path, eval_metric, metrics, best):
    states = write_run(tmp_path / 'run', metrics, eval_metric)
    out = tmp_path / 'avg.safetensors'
    assert avg_checkpoints.main(['--input', str(tmp_path / 'run'), '-n', '2', '--output', str(out)]) == 0
    content = models.load_checkpoint_file(str(out))
    assert [s['epoch'] for s in content['averaged_from']] == best
    assert content['class_to_idx'] == CLASS_TO_IDX and content['model_name'] == 'posmlp_t'
    expected = mean_of(states, best)
    assert all(torch.allclose(content['state_dict'][k], v, atol=1e-7) for k, v in expected.items())
    expected_logits = logits(model_of(expected), IMAGES)
    assert torch.allclose(logits(models.create_model_from_checkpoint(str(out)), IMAGES), expected_logits, atol=1e-5)
    assert torch.allclose(logits(timm_pretrained(out), IMAGES), expected_logits, atol=1e-5)


def test_avg_no_sort_averages_every_epoch_once_with_the_live_weights(tmp_path, monkeypatch):
    states = write_run(tmp_path / 'run', [3., 1., 2.])
    monkeypatch.chdir(tmp_path)
    assert avg_checkpoints.main(['--input', 'run', '--no-sort', '--no-use-ema']) == 0
    content = models.load_checkpoint_file(str(tmp_path / 'averaged.pth'))
    assert sorted(s['epoch'] for s in content['averaged_from']) == [0, 1, 2]
    expected = mean_of(states, [0, 1, 2], key='state_dict')
    assert all(torch.allclose(content['state_dict'][k], v, atol=1e-7) for k, v in expected.items())


def test_avg_refuses_mixed_weights_other_models_and_missing_files(tmp_path, capsys):
    write_run(tmp_path / 'run', [1., 2.])
    write_checkpoint(tmp_path / 'run' / 'checkpoint-5.pth.tar', 5, 9., ema=False)
    assert avg_checkpoints.main(['--input', str(tmp_path / 'run'), '--output', str(tmp_path / 'a.pth')]) == 1
    assert 'some checkpoints have EMA weights and some not. Pass --no-use-ema' in capsys.readouterr().out
    wide = dict(TINY_KWARGS, embed_dims=(8, 16, 16, 64))
    write_checkpoint(tmp_path / 'run' / 'checkpoint-5.pth.tar', 5, 9., model_kwargs=wide)
    assert avg_checkpoints.main(['--input', str(tmp_path / 'run'), '--output', str(tmp_path / 'a.pth')]) == 1
    assert 'only checkpoints of one model can be averaged' in capsys.readouterr().out
    assert avg_checkpoints.main(['--input', str(tmp_path / 'none'), '--output', str(tmp_path / 'a.pth')]) == 1
    assert 'no checkpoints match' in capsys.readouterr().out
    assert not (tmp_path / 'a.pth').exists()


# --- Weights files that cannot be written -----------------------------------------------------------------

def failing_writes(monkeypatch, folder, code):
    """Files under `folder` cannot be made (`code` EROFS/EACCES) or, for ENOSPC, not finished: the disk is full."""
    if code == errno.ENOSPC:
        def fsync(fd):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr(os, 'fsync', fsync)
        return
    refuse_under(monkeypatch, folder, 'open', code)


@pytest.mark.parametrize('code, fix', [(errno.ENOSPC, 'free space on that disk, or point --output at another'),
                                       (errno.EROFS, 'that file system is read-only: point --output at'),
                                       (errno.EACCES, 'you may not write there: point --output at')])
@pytest.mark.parametrize('tool', ['clean', 'avg'])
def test_a_weights_file_that_cannot_be_written_is_one_line_naming_it(tmp_path, capsys, monkeypatch, tool, code,
                                                                      fix):
    write_run(tmp_path / 'run', [1.])
    out = tmp_path / 'out'
    out.mkdir()
    target = out / 'w.pth'
    failing_writes(monkeypatch, out, code)
    if tool == 'clean':
        argv = ['--checkpoint', str(tmp_path / 'run' / 'last.pth.tar'), '--no-hash', '--output', str(target)]
        assert clean_checkpoint.main(argv) == 1
    else:
        assert avg_checkpoints.main(['--input', str(tmp_path / 'run'), '--output', str(target)]) == 1
    out_text = capsys.readouterr().out
    stopped = [line for line in out_text.splitlines() if 'Stopped:' in line]
    assert len(stopped) == 1 and 'Traceback' not in out_text, out_text
    assert f'cannot write {target}: {os.strerror(code)}; {fix}' in stopped[0] and '.partial-' not in stopped[0]
    assert list(out.iterdir()) == []


def test_avg_counts_files_as_copies_only_when_their_weights_are_the_same(tmp_path, capsys):
    folder = tmp_path / 'mix'
    folder.mkdir()
    write_checkpoint(folder / 'a.pth.tar', epoch=0, metric=50.0, seed=1)
    write_checkpoint(folder / 'b.pth.tar', epoch=0, metric=50.0, seed=2)
    shutil.copy(folder / 'a.pth.tar', folder / 'c.pth.tar')
    assert avg_checkpoints.main(['--input', str(folder), '--output', str(tmp_path / 'avg.pth')]) == 0
    assert f'Left out {folder / "c.pth.tar"}: a copy of {folder / "a.pth.tar"}' in capsys.readouterr().out
    averaged = models.load_checkpoint_file(str(tmp_path / 'avg.pth'))['averaged_from']
    assert sorted(s['file'] for s in averaged) == ['a.pth.tar', 'b.pth.tar']


def test_avg_refuses_checkpoints_with_other_class_maps(tmp_path, capsys):
    folder = tmp_path / 'mix'
    folder.mkdir()
    write_checkpoint(folder / 'a.pth.tar', epoch=0, metric=50.0)
    write_checkpoint(folder / 'b.pth.tar', epoch=1, metric=40.0, class_to_idx={'ant': 0, 'bee': 1, 'cow': 2})
    assert avg_checkpoints.main(['--input', str(folder), '--output', str(tmp_path / 'avg.pth')]) == 1
    out = capsys.readouterr().out
    assert f'{folder / "b.pth.tar"} and {folder / "a.pth.tar"} map class names to other labels' in out
    assert not (tmp_path / 'avg.pth').exists()
