"""A checkpoint loads into a model with other windows and image size, through timm's pretrained route, the
project's loader and train.py --initial-checkpoint: GQPE carries over, LRPE tables and token biases are
resampled, SGU is refused."""
import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table

import models
import train
import validate
from models import CheckpointError
from utils.args import parse_train_args
from conftest import ROOT, TINY_KWARGS, make_image_folder, reference_path

SOURCE = dict(TINY_KWARGS, num_classes=3)  # 32 px: maps 8, 4, 2, 1 in windows 4, 2, 2, 1
TARGET = dict(img_size=64, win_size=(8, 4, 2, 1))  # 64 px: maps 16, 8, 4, 2, two windows a side each
ROUTES = ('timm', 'project', 'load_weights')


def source_checkpoint(tmp_path, gate='gqpe'):
    torch.manual_seed(0)
    model = timm.create_model('posmlp_t', gate=gate, **SOURCE)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / f'{gate}.pth.tar'
    models.save_checkpoint_file(dict(model_name='posmlp_t', model_kwargs=dict(SOURCE, gate=gate),
                                     state_dict=model.state_dict()), str(path))
    return model.state_dict(), path


def load(route, path, gate, **target):
    kwargs = dict(SOURCE, gate=gate, **target)
    if route == 'timm':
        overlay = dict(file=str(path), num_classes=3)
        return timm.create_model('posmlp_t', pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    if route == 'project':
        return models.create_model_from_checkpoint(str(path), **target)
    model = timm.create_model('posmlp_t', **kwargs)  # as train.py --initial-checkpoint does
    models.load_weights(model, models.read_checkpoint(str(path)).state_dict, str(path), finetune=True)
    return model


def gaussian_maps(centers, spreads, win):
    """The paper's Gaussian, softmax over n of -1/2 (D - delta)^T S S^T (D - delta), with D = (dx, dy) for
    every pair of tokens m, n of a win x win window: dx = c_n - c_m, dy = r_m - r_n."""
    rows, cols = torch.meshgrid(torch.arange(win), torch.arange(win), indexing='ij')
    rows, cols = rows.flatten(), cols.flatten()
    offsets = torch.stack([cols[None, :] - cols[:, None], rows[:, None] - rows[None, :]], -1).double()
    diff = offsets[None] - centers.double()[:, None, None, :]
    precision = (spreads @ spreads.transpose(-1, -2)).double()
    return (-0.5 * torch.einsum('gmni,gij,gmnj->gmn', diff, precision, diff)).softmax(-1)


@pytest.mark.parametrize('route', ROUTES)
@pytest.mark.parametrize('gate', ['gqpe', 'lrpe', 'sgu'])
def test_same_windows_give_identical_weights(tmp_path, route, gate):
    state, path = source_checkpoint(tmp_path, gate)
    model = load(route, path, gate, img_size=64)
    assert model.state_dict().keys() == state.keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


@pytest.mark.parametrize('route', ROUTES)
def test_gqpe_carries_over_and_its_maps_are_the_gaussian_at_the_new_offsets(tmp_path, route, caplog):
    state, path = source_checkpoint(tmp_path)
    with caplog.at_level('INFO'):
        model = load(route, path, 'gqpe', **TARGET)
    for name, value in model.state_dict().items():
        if '.pos.' in name:
            assert torch.equal(value, state[name]), name
    pos = model.stages[0].blocks[0].gate.pos
    assert pos.win_size == 8
    with torch.no_grad():
        torch.testing.assert_close(pos().double(), gaussian_maps(pos.centers, pos.spreads, 8), atol=1e-6, rtol=0)
    assert 'stage 0 4x4 -> 8x8: token biases' in caplog.text and 'stage 1 2x2 -> 4x4' in caplog.text
    assert 'GQPE centres and spreads carried over unchanged' in caplog.text and 'stage 2' not in caplog.text


@pytest.mark.parametrize('route', ROUTES)
def test_lrpe_tables_and_token_biases_are_resampled(tmp_path, route, caplog):
    state, path = source_checkpoint(tmp_path, 'lrpe')
    with caplog.at_level('INFO'):
        model = load(route, path, 'lrpe', **TARGET)
    loaded = model.state_dict()
    table, old_table = loaded['stages.0.blocks.0.gate.pos.table'], state['stages.0.blocks.0.gate.pos.table']
    assert table.shape == (15 * 15, 2)
    torch.testing.assert_close(table, resize_rel_pos_bias_table(old_table, (8, 8), (225, 2)), atol=0, rtol=0)
    # Offsets of at most one token keep their weights: timm's resampling stretches only the farther ones.
    torch.testing.assert_close(table.view(15, 15, 2)[6:9, 6:9], old_table.view(7, 7, 2)[2:5, 2:5])
    bias, old_bias = loaded['stages.1.blocks.0.gate.token_bias'], state['stages.1.blocks.0.gate.token_bias']
    assert bias.shape == (1, 16, 1)
    expected = resample_abs_pos_embed(old_bias, [4, 4], [2, 2], num_prefix_tokens=0)
    torch.testing.assert_close(bias, expected, atol=0, rtol=0)
    assert 'stage 0 4x4 -> 8x8: LRPE tables and token biases' in caplog.text and 'GQPE' not in caplog.text
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()


@pytest.mark.parametrize('route', ROUTES)
def test_sgu_at_other_windows_is_refused_with_the_windows_named(tmp_path, route):
    _, path = source_checkpoint(tmp_path, 'sgu')
    error = ValueError if route == 'timm' else CheckpointError
    with pytest.raises(error, match=r"SGU gate's 16x16 token-mixing matrix belongs to 4x4 windows .* model's "
                                    r"8x8; build the model with the checkpoint's windows"):
        load(route, path, 'sgu', **TARGET)


def test_fine_tune_at_a_larger_window_trains_and_evaluates(tmp_path, in_process_run, capsys):
    data = make_image_folder(tmp_path / 'data', per_class=2, size=64)
    fast = ['-b', '2', '-j', '0', '--threads', '1', '--warmup-epochs', '0', '--cooldown-epochs', '0',
            '--epochs', '1', '--output', str(tmp_path / 'out')]

    def model_args(**changes):
        return ['--model-kwargs', *[f'{k}={v!r}' for k, v in dict(TINY_KWARGS, **changes).items()]]

    assert train.main([str(data), *model_args(), *fast, '--experiment', 'at32']) == 0
    source = tmp_path / 'out' / 'at32' / 'last.pth.tar'
    assert train.main([str(data), *model_args(**TARGET), '--img-size', '64', *fast, '--experiment', 'at64',
                       '--initial-checkpoint', str(source)]) == 0
    assert 'stage 0 4x4 -> 8x8: token biases' in capsys.readouterr().out
    tuned = tmp_path / 'out' / 'at64' / 'last.pth.tar'
    results = tmp_path / 'results.json'
    assert validate.main([str(data / 'val'), '--checkpoint', str(tuned), '--results-file', str(results),
                          '-b', '2', '-j', '0', '--threads', '1']) == 0
    report = capsys.readouterr().out
    assert 'top1' in report and results.exists()
    rebuilt = models.create_model_from_checkpoint(str(tuned))
    assert rebuilt.stages[0].blocks[0].gate.pos.win_size == 8 and rebuilt.img_size == (64, 64)


def test_the_384_config_fits_whole_windows_and_takes_the_authors_224_weights(tmp_path, caplog):
    args = parse_train_args([str(tmp_path), '-c', str(ROOT / 'configs' / 'posmlp_t_384.yaml')])
    target = dict(img_size=args.img_size, **args.model_kwargs)
    with torch.device('meta'):  # without padding, a size that leaves part of a window is an error
        timm.create_model(args.model, dynamic_img_pad=False, **target)
    path = reference_path('gqpe_tiny_original_checkpoint.pth.tar')  # the authors' layout, windows 14 and 7
    with caplog.at_level('INFO'):
        model = models.create_model_from_checkpoint(str(path), **target).eval()
    assert 'stage 3 7x7 -> 12x12: token biases' in caplog.text
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 384, 384))).all()
