"""Figures: token-mixing maps from checkpoints (authors' GQPE/LRPE fixtures, a project SGU checkpoint) and curves."""
import builtins
import csv

import pytest
import timm
import torch

import models
from conftest import TINY_KWARGS, reference_path
from models.posmlp import PoSGU
from utils import visualize
from utils.errors import VisualizeError

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def assert_png(path):
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


@torch.no_grad()
def measured_maps(gate, win_size, output_token):
    """What output token m of `gate` reads from each input token n, measured through the gate's forward
    rather than read off its weights: batch entry n puts a probe in input token n (zeros elsewhere, v = 1),
    and output m's change from an all-zero input, per unit of probe as the gate sees it, is map[m, n].
    Returns (groups, w, w) like `block_token_maps`: one map per PoSGU group, SGU's single map."""
    num_tokens = win_size * win_size
    if isinstance(gate, PoSGU):
        channels = gate.gamma  # channel k is in group k % gamma: channel g stands for group g
        probe = torch.ones(channels)
        seen = probe  # PoSGU mixes u as it is
    else:
        channels = gate.norm.normalized_shape[0]
        probe = torch.tensor([1., -1.]).repeat(channels // 2)
        seen = gate.norm(probe) - gate.norm(torch.zeros(channels))  # SGU mixes LN(u)
    one_hot = torch.cat([torch.eye(num_tokens), torch.zeros(1, num_tokens)])  # last entry: all-zero input
    u = one_hot[:, None, :, None] * probe  # (batch, 1 window, tokens, channels)
    out = gate(torch.cat([u, torch.ones_like(u)], -1))[:, 0, output_token]
    change = (out[:-1] - out[-1]) / seen  # (input tokens, channels)
    if not isinstance(gate, PoSGU):
        change = change[:, :1]  # one map shared by every channel
    return change.t().reshape(-1, win_size, win_size)


@pytest.fixture(scope='module')
def sgu_checkpoint(tmp_path_factory):
    """A checkpoint in this project's format of a tiny model with gMLP's gate."""
    model = timm.create_model('posmlp_t', gate='sgu', num_classes=3, **TINY_KWARGS)
    with torch.no_grad():
        model.stages[0].blocks[0].gate.proj.weight.normal_()  # some structure to draw (init is ~1e-6)
    path = tmp_path_factory.mktemp('sgu') / 'sgu.pth.tar'
    models.save_checkpoint_file(dict(
        epoch=0, model_name='posmlp_t', model_kwargs=dict(gate='sgu', num_classes=3, **TINY_KWARGS),
        state_dict=model.state_dict()), str(path))
    return path, model


@pytest.fixture(scope='module')
def gqpe_fixture():
    path = reference_path('gqpe_tiny_original_checkpoint.pth.tar')
    return path, models.create_model_from_checkpoint(str(path))


@pytest.fixture(scope='module')
def lrpe_fixture():
    path = reference_path('lrpe_tiny_original_checkpoint.pth.tar')
    return path, models.create_model_from_checkpoint(str(path))


def test_gqpe_fixture_maps(tmp_path, gqpe_fixture):
    checkpoint, model = gqpe_fixture
    out = tmp_path / 'gqpe.png'
    assert visualize.main(['maps', '--checkpoint', str(checkpoint), '--blocks', '0.0',
                           '--token', 'center', '--out', str(out)]) == 0
    assert_png(out)
    maps = visualize.block_token_maps(model, 0, 0, 'center')
    assert maps.kind == 'GQPE' and maps.token == (7, 7) and maps.maps.shape == (8, 14, 14)
    # Each group's row is a softmax over the window's input tokens.
    torch.testing.assert_close(maps.maps.sum((1, 2)), torch.ones(8))
    torch.testing.assert_close(maps.maps, measured_maps(model.stages[0].blocks[0].gate, 14, 7 * 14 + 7))


def test_lrpe_fixture_maps(tmp_path, lrpe_fixture):
    checkpoint, model = lrpe_fixture
    out = tmp_path / 'lrpe.png'
    assert visualize.draw_token_maps(str(checkpoint), ['0.0'], str(out), token='3,4') == str(out)
    assert_png(out)
    maps = visualize.block_token_maps(model, 0, 0, '3,4')
    assert maps.kind == 'LRPE' and maps.signed and maps.maps.shape == (8, 14, 14)
    torch.testing.assert_close(maps.maps, measured_maps(model.stages[0].blocks[0].gate, 14, 3 * 14 + 4))


def test_sgu_checkpoint_maps(tmp_path, sgu_checkpoint):
    path, model = sgu_checkpoint
    out = tmp_path / 'sgu.png'
    visualize.draw_token_maps(str(path), ['0.0', '1.0'], str(out), token='center')
    assert_png(out)
    maps = visualize.block_token_maps(model, 0, 0, '6')
    assert maps.kind == 'SGU' and maps.token == (1, 2) and maps.maps.shape == (1, 4, 4)
    torch.testing.assert_close(maps.maps, measured_maps(model.stages[0].blocks[0].gate, 4, 1 * 4 + 2))


def test_bad_block_and_token_name_the_fix(tmp_path, sgu_checkpoint, capsys):
    path, model = sgu_checkpoint
    with pytest.raises(VisualizeError, match=r'no such block.*depths \[1, 1, 1, 1\]'):
        visualize.parse_block('4.0', model)
    with pytest.raises(VisualizeError, match='no such block'):
        visualize.parse_block('0.1', model)
    with pytest.raises(VisualizeError, match='STAGE.BLOCK'):
        visualize.parse_block('0-0', model)
    with pytest.raises(VisualizeError, match=r'outside a 4x4 window'):
        visualize.parse_token('4,0', 4)
    with pytest.raises(VisualizeError, match="'center'"):
        visualize.parse_token('middle', 4)
    out = tmp_path / 'never.png'
    assert visualize.main(['maps', '--checkpoint', str(path), '--blocks', '9.0', '--out', str(out)]) == 1
    assert 'no such block' in capsys.readouterr().err and not out.exists()


def write_summary(path, epochs=4, ema=True):
    names = ['epoch', 'lr', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5']
    names += ['ema_loss', 'ema_top1', 'ema_top5'] if ema else []
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for e in range(epochs):
            loss = 2.0 / (e + 1)
            row = [e, 1e-3, loss, loss * 0.9, 50 + 10 * e, 90 + e]
            row += [loss * 0.95, 45 + 11 * e, 89 + e] if ema else []
            writer.writerow(row)
    return path


def test_curves(tmp_path):
    first = write_summary(tmp_path / 'a.csv')
    second = write_summary(tmp_path / 'b.csv', epochs=3, ema=False)
    out = tmp_path / 'curves.png'
    assert visualize.main(['curves', str(first), str(second), str(second), '--labels', 'ema run', 'plain', 'plain',
                           '--out', str(out)]) == 0
    assert_png(out)
    columns = visualize.read_summary(str(first))
    assert columns['epoch'] == [0, 1, 2, 3] and columns['ema_top1'][-1] == 78.0


def test_curves_bad_input(tmp_path):
    summary = write_summary(tmp_path / 'a.csv')
    with pytest.raises(VisualizeError, match='one label per'):
        visualize.draw_curves([str(summary)], str(tmp_path / 'x.png'), labels=['a', 'b'])
    with pytest.raises(VisualizeError, match='does not exist'):
        visualize.read_summary(str(tmp_path / 'missing.csv'))
    (tmp_path / 'other.csv').write_text('step,value\n0,1\n')
    with pytest.raises(VisualizeError, match='lacks the column'):
        visualize.read_summary(str(tmp_path / 'other.csv'))


def test_missing_matplotlib_says_how_to_install(monkeypatch, tmp_path, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == 'matplotlib' or name.startswith('matplotlib.'):
            raise ImportError(f'No module named {name!r}')
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, '__import__', no_matplotlib)
    with pytest.raises(VisualizeError, match='pip install matplotlib'):
        visualize.require_pyplot()
    summary = write_summary(tmp_path / 'a.csv')
    assert visualize.main(['curves', str(summary), '--out', str(tmp_path / 'c.png')]) == 1
    assert 'pip install matplotlib' in capsys.readouterr().err
