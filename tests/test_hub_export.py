"""export_hub.py: a checkpoint to a folder timm loads offline ('local-dir:'), with a model card of its run."""
import csv
import errno
import json
import os
import socket

import pytest
import safetensors
import safetensors.torch
import timm
import torch
import yaml

from conftest import TINY_MODEL_ARGS, make_image_folder, refuse_under, restored_process_state
from tool_helpers import CLASS_TO_IDX, logits, write_checkpoint

import export_hub
import models
import train

pytestmark = pytest.mark.usefixtures('in_process_run')
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('hub')
    data = make_image_folder(tmp / 'data', per_class=4)
    with restored_process_state():
        assert train.main([str(data), *TINY_MODEL_ARGS, '-b', '4', '-j', '0', '--threads', '1', '--epochs', '2',
                           '--warmup-epochs', '0', '--cooldown-epochs', '0', '--model-ema', '--model-ema-decay', '0.5',
                           '--output', str(tmp / 'out'), '--experiment', 'run']) == 0
    return tmp / 'out' / 'run'


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('the network was reached')
    monkeypatch.setattr(socket.socket, 'connect', refuse)


def test_timm_loads_the_export_offline_with_the_checkpoints_logits_and_input(trained_run, tmp_path, no_network):
    best = trained_run / 'model_best.pth.tar'
    out = tmp_path / 'hub' / 'posmlp-tiny'
    assert export_hub.main(['--checkpoint', str(best), '--output', str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'args.yaml', 'config.json', 'model.safetensors']
    assert [p.name for p in out.parent.iterdir()] == ['posmlp-tiny']  # nothing left beside it

    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    expected = models.create_model_from_checkpoint(str(best))
    assert torch.equal(logits(model, IMAGES), logits(expected, IMAGES))
    config = timm.data.resolve_data_config({}, model=model)
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}  # config.json gives lists
    assert config['input_size'] == (3, 32, 32) and config == timm.data.resolve_data_config({}, model=expected)
    saved = json.loads((out / 'config.json').read_text())
    assert saved['label_names'] == ['a', 'b', 'c'] and 'tag' not in saved['pretrained_cfg']
    assert yaml.safe_load((out / 'args.yaml').read_text())['epochs'] == 2


def test_the_model_card_gives_the_runs_metrics_recipe_data_and_command(trained_run, tmp_path):
    best = trained_run / 'model_best.pth.tar'
    out = tmp_path / 'card'
    assert export_hub.main(['--checkpoint', str(best), '--output', str(out)]) == 0
    card = (out / 'README.md').read_text()
    epoch = torch.load(best, weights_only=True)['epoch']
    with open(trained_run / 'summary.csv', newline='') as f:
        row = next(r for r in csv.DictReader(f) if int(r['epoch']) == epoch)
    assert f'These are the EMA weights of epoch {epoch}.' in card
    assert f'| {epoch} | {float(row["ema_top1"]):.3f} | {float(row["ema_top5"]):.3f} | {float(row["ema_loss"]):.4f} |' \
        in card
    assert '3 classes: a, b, c.' in card and 'Input: 32x32' in card
    assert 'validated on its `val/` split' in card  # the folder it used, not the option's default name
    assert '| `epochs` | `2` |' in card and '| `model_ema_decay` | `0.5` |' in card
    assert 'python train.py -c args.yaml' in card and f"timm.create_model('local-dir:{out}', pretrained=True)" in card


def test_a_checkpoint_without_its_run_gives_its_recorded_metric_and_the_live_weights(tmp_path):
    write_checkpoint(tmp_path / 'ckpt.pth.tar', epoch=3, metric=77.5)
    assert export_hub.main(['--checkpoint', str(tmp_path / 'ckpt.pth.tar'), '--output', str(tmp_path / 'h'),
                            '--no-use-ema']) == 0
    card = (tmp_path / 'h' / 'README.md').read_text()
    assert 'live (non-EMA) weights of epoch 3' in card and 'records top1 77.500' in card
    assert json.loads((tmp_path / 'h' / 'config.json').read_text())['label_names'] == list(CLASS_TO_IDX)


def test_an_existing_folder_is_refused(tmp_path, capsys):
    write_checkpoint(tmp_path / 'ckpt.pth.tar')
    (tmp_path / 'h').mkdir()
    assert export_hub.main(['--checkpoint', str(tmp_path / 'ckpt.pth.tar'), '--output', str(tmp_path / 'h')]) == 1
    assert 'already exists; choose a new --output folder' in capsys.readouterr().out
    assert list((tmp_path / 'h').iterdir()) == []


def test_an_export_that_cannot_be_written_is_one_line_naming_the_folder(tmp_path, capsys, monkeypatch):
    write_checkpoint(tmp_path / 'ckpt.pth.tar')
    out = tmp_path / 'out'
    out.mkdir()

    def full_disk(*args, **kwargs):  # as safetensors reports a full disk
        raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                          'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, 'save_file', full_disk)
    base = ['--checkpoint', str(tmp_path / 'ckpt.pth.tar'), '--output', str(out / 'h')]
    assert export_hub.main(base) == 1
    text = capsys.readouterr().out
    assert f'Stopped: cannot write {out / "h"}: No space left on device; free space on that disk, or point --output ' \
           f'at another.' in text and 'Traceback' not in text
    assert list(out.iterdir()) == []
    monkeypatch.undo()
    refuse_under(monkeypatch, out, 'mkdir')
    assert export_hub.main(base) == 1
    text = capsys.readouterr().out
    assert f'Stopped: cannot write {out / "h"}: {os.strerror(errno.EROFS)}; that file system is read-only: point ' \
           f'--output at a writable disk.' in text and '.tmp-' not in text
    assert list(out.iterdir()) == []
