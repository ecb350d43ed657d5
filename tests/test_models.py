"""The model family: registry, exact parameter counts, the authors' fixtures, timm conventions."""
import json
import os

import pytest
import timm
import timm.optim
import torch

import models
from models import CheckpointError
from models.posmlp import GQPE, LRPE, MAP_FLOOR, ConvStem, relative_offsets
from conftest import TINY_KWARGS, reference_path

FIXTURES = ('gqpe_tiny', 'lrpe_tiny')


def fixture_kwargs(name):
    cfg = json.loads(reference_path(f'{name}_config.json').read_text())
    return dict(
        embed_dims=cfg['embed_dims'], depths=cfg['depths'], mlp_ratio=cfg['mlp_ratio'], gamma=cfg['gamma'],
        win_size=cfg['win_size'], num_classes=cfg['num_classes'],
        gate='gqpe' if cfg['quadratic'] else 'lrpe', generalized=cfg.get('generalized', True),
    )


def fixture_io(name):
    return torch.load(reference_path(f'{name}_io.pt'), map_location='cpu', weights_only=True)


@pytest.mark.parametrize('name,count', [
    ('posmlp_t', 20_925_538), ('posmlp_s', 36_816_450), ('posmlp_b', 81_976_834),
])
def test_parameter_counts_match_the_authors(name, count):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


def test_registry_lists_every_variant():
    expected = {f'posmlp_{s}{g}' for s in 'tsb' for g in ('', '_lrpe', '_sgu')}
    assert set(timm.list_models('posmlp*')) == expected
    for name in expected:
        with torch.device('meta'):
            model = timm.create_model(name, num_classes=7)
        gate = name.split('_')[2] if name.count('_') == 2 else 'gqpe'
        block = model.stages[0].blocks[0]
        assert type(block.gate).__name__ == ('SGU' if gate == 'sgu' else 'PoSGU')
        if gate != 'sgu':
            assert isinstance(block.gate.pos, GQPE if gate == 'gqpe' else LRPE)
        assert model.num_classes == 7 and model.pretrained_cfg['crop_pct'] == 0.9


def test_gate_is_a_model_argument():
    with torch.device('meta'):
        model = timm.create_model('posmlp_t', gate='lrpe')
        plain = timm.create_model('posmlp_t', generalized=False)
    assert isinstance(model.stages[2].blocks[0].gate.pos, LRPE)
    assert plain.stages[0].blocks[0].gate.pos.spreads.shape == (8,)


@pytest.mark.parametrize('name', FIXTURES)
@pytest.mark.parametrize('use_ema', [False, True])
@pytest.mark.parametrize('impl', ['fast', 'reference'])
def test_fixture_logits_through_project_loader(name, use_ema, impl):
    io = fixture_io(name)
    model = models.create_model_from_checkpoint(
        str(reference_path(f'{name}_original_checkpoint.pth.tar')), use_ema=use_ema, gate_impl=impl).eval()
    with torch.no_grad():
        logits = model(io['input'])
    torch.testing.assert_close(logits, io['logits_ema' if use_ema else 'logits'], atol=1e-4, rtol=0)


@pytest.mark.parametrize('name', FIXTURES)
def test_fixture_logits_through_timm_pretrained(name, tmp_path):
    io = fixture_io(name)
    original = reference_path(f'{name}_original_checkpoint.pth.tar')
    kwargs = fixture_kwargs(name)
    overlay = dict(file=str(original), num_classes=kwargs['num_classes'])
    model = timm.create_model('posmlp_t', pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(io['input']), io['logits_ema'], atol=1e-4, rtol=0)

    # A checkpoint without EMA weights gives its live weights on the same path.
    raw = models.load_checkpoint_file(str(original))
    live_only = tmp_path / 'live.pth.tar'
    torch.save({'state_dict': raw['state_dict']}, live_only)
    overlay['file'] = str(live_only)
    model = timm.create_model('posmlp_t', pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(io['input']), io['logits'], atol=1e-4, rtol=0)


@pytest.mark.parametrize('name', FIXTURES)
def test_architecture_is_read_off_the_authors_weights(name):
    loaded = models.read_checkpoint(str(reference_path(f'{name}_original_checkpoint.pth.tar')))
    inferred = models.infer_model_kwargs(loaded.state_dict)
    expected = fixture_kwargs(name)
    for key in ('embed_dims', 'depths', 'mlp_ratio', 'gamma', 'win_size'):
        assert list(inferred[key]) == list(expected[key]), key
    assert inferred['gate'] == expected['gate'] and inferred['num_classes'] == expected['num_classes']
    assert loaded.weights == 'state_dict_ema'


@pytest.mark.parametrize('name', ['posmlp_s', 'posmlp_b_lrpe', 'posmlp_s_sgu'])
def test_architecture_read_off_the_weights_is_named_by_its_widths_and_gate(name):
    model = timm.create_model(name, depths=(1, 1, 1, 1), mlp_ratio=1, num_classes=5)
    loaded = models.LoadedCheckpoint(path='weights', state_dict=model.state_dict(), weights='state_dict')
    assert models.create_model_from_checkpoint(loaded).pretrained_cfg['architecture'] == name


def test_rebuilt_position_buffers_equal_the_authors():
    raw = models.load_checkpoint_file(str(reference_path('gqpe_tiny_original_checkpoint.pth.tar')))['state_dict']
    gqpe = GQPE(14, 8)
    torch.testing.assert_close(gqpe.rel_features.permute(1, 2, 0), raw['levels.0.encoder.0.gate_unit.pos.rel_indices'])
    raw = models.load_checkpoint_file(str(reference_path('lrpe_tiny_original_checkpoint.pth.tar')))['state_dict']
    lrpe = LRPE(14, 8)
    assert torch.equal(lrpe.rel_index, raw['levels.0.encoder.0.gate_unit.pos.window_relative_position_index'])
    dx, dy = relative_offsets(3)
    assert dx[0, 1] == 1 and dy[0, 3] == -1  # token 1 is right of token 0; token 3 is below it


def test_gqpe_weights_below_the_floor_are_zero_not_subnormal():
    """Far from its centre a 14x14 window's Gaussian underflows; what is left below 1e-30 is dropped."""
    gqpe = GQPE(14, 8)
    with torch.no_grad():
        maps = gqpe()
        exact = (gqpe.feature_weights() @ gqpe.rel_features.flatten(1)).unflatten(1, (196, 196)).softmax(-1)
    assert (exact[exact > 0] < 1e-30).any()  # the case exists at init
    assert not ((maps > 0) & (maps < MAP_FLOOR)).any()
    torch.testing.assert_close(maps, exact, atol=1e-29, rtol=0)


def test_features_only_returns_the_four_level_maps():
    model = timm.create_model('posmlp_t', features_only=True).eval()
    assert model.feature_info.channels() == [96, 192, 384, 768]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 224, 224))
    assert [tuple(f.shape) for f in feats] == [(1, 96, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14), (1, 768, 7, 7)]


def test_timm_model_interface():
    model = timm.create_model('posmlp_t', num_classes=5, **TINY_KWARGS).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 32, 1, 1)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
        torch.testing.assert_close(model.forward_head(feats), model(x))
    assert model.get_classifier().out_features == 5
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0, '')
    assert model(x).shape == (2, 32, 1, 1)


def test_weight_decay_groups_follow_the_authors_recipe():
    """As in the authors' training, positional parameters are decayed; norms and biases are not."""
    model = timm.create_model('posmlp_t', **TINY_KWARGS)
    optimizer = timm.optim.create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    decay_of = {id(p): g['weight_decay'] for g in optimizer.param_groups for p in g['params']}
    params = dict(model.named_parameters())
    for name in ('stages.0.blocks.0.gate.pos.centers', 'stages.0.blocks.0.gate.pos.spreads',
                 'stages.0.blocks.0.gate.token_bias', 'stages.0.blocks.0.fc1.weight'):
        assert decay_of[id(params[name])] == 0.05, name
    for name in ('stages.0.blocks.0.fc1.bias', 'stages.0.blocks.0.norm.weight', 'stem.norm1.weight'):
        assert decay_of[id(params[name])] == 0.0, name


@pytest.mark.parametrize('gate', ['gqpe', 'lrpe', 'sgu'])
@pytest.mark.parametrize('impl', ['fast', 'reference'])
def test_every_parameter_gets_a_gradient(gate, impl):
    # Windows of at least 2x2 everywhere: a 1-token window's softmax is constant.
    kwargs = dict(TINY_KWARGS, img_size=64, win_size=(4, 4, 2, 2))
    model = timm.create_model('posmlp_t', gate=gate, gate_impl=impl, num_classes=4, **kwargs)
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_fused_stem_folds_batchnorm_into_the_convs():
    torch.manual_seed(0)
    stem = ConvStem(3, 16).eval()
    with torch.no_grad():
        for norm in (stem.norm1, stem.norm2, stem.norm3):
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.normal_()
            norm.bias.normal_()
    x = torch.randn(2, 3, 32, 32)
    expected = stem(x)
    fused = stem.fuse()
    assert [type(m) for m in fused] == [torch.nn.Conv2d, torch.nn.GELU] * 2 + [torch.nn.Conv2d]
    torch.testing.assert_close(fused(x), expected, atol=1e-5, rtol=1e-5)
    # The convs keep their state-dict names; the norms are gone.
    assert set(fused.state_dict()) == {f'conv{i}.{p}' for i in (1, 2, 3) for p in ('weight', 'bias')}


def test_norm_and_activation_layers_are_arguments():
    model = timm.create_model('posmlp_t', norm_layer='rmsnorm', act_layer='silu', **TINY_KWARGS)
    block = model.stages[1].blocks[0]
    assert type(block.norm).__name__ == 'RmsNorm' and type(model.norm).__name__ == 'RmsNorm'
    assert type(model.stages[1].downsample.norm).__name__ == 'RmsNorm'
    assert isinstance(block.act, torch.nn.SiLU) and isinstance(model.stem.act, torch.nn.SiLU)
    assert isinstance(model.stem.norm1, torch.nn.BatchNorm2d)  # the stem keeps its BatchNorms
    reference = timm.create_model('posmlp_t', norm_layer='rmsnorm', act_layer='silu', gate_impl='reference',
                                  **TINY_KWARGS)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x), atol=1e-5, rtol=1e-5)
    default = timm.create_model('posmlp_t', **TINY_KWARGS)
    assert default.norm.eps == 1e-6 and isinstance(default.stages[0].blocks[0].act, torch.nn.GELU)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model('posmlp_t', num_classes=4, **TINY_KWARGS)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], atol=1e-6, rtol=1e-5)


def test_drop_path_grows_linearly_over_all_blocks():
    with torch.device('meta'):
        model = timm.create_model('posmlp_t', drop_path_rate=0.1)
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, 'drop_prob') else 0.
             for s in model.stages for b in s.blocks]
    assert len(rates) == 24 and rates[0] == 0 and abs(rates[-1] - 0.1) < 1e-7
    assert all(b > a for a, b in zip(rates, rates[1:]))


def test_input_size_error_names_sizes_that_fit():
    model = timm.create_model('posmlp_t', dynamic_img_pad=False).eval()
    with pytest.raises(ValueError, match=r'256x256.*: 224 or 448 instead of 256; or .*dynamic_img_pad=True'):
        model(torch.randn(1, 3, 256, 256))
    with pytest.raises(ValueError, match='224 or 448 instead of 256'):
        timm.create_model('posmlp_t', img_size=256, dynamic_img_pad=False)
    with pytest.raises(ValueError, match=r'nearby: 224 instead of 200; 224 or 448 instead of 300; or'):
        model(torch.randn(1, 3, 200, 300))  # each side that does not fit gets its own suggestion
    with pytest.raises(ValueError, match=r'nearby: 224 or 448 instead of 256; or'):
        model(torch.randn(1, 3, 448, 256))  # 448 fits: no suggestion for it
    tiny = timm.create_model('posmlp_t', dynamic_img_pad=False, **TINY_KWARGS).eval()
    for side in (32, 64):  # every size whose level maps divide by the windows works
        assert tiny(torch.randn(1, 3, side, side)).shape == (1, 1000)


def test_per_stage_arguments_take_one_number_for_all_stages():
    kwargs = dict(TINY_KWARGS, mlp_ratio=3, gamma=2)
    model = timm.create_model('posmlp_t', **kwargs)
    assert [s.blocks[0].fc1.out_features for s in model.stages] == [3 * d for d in TINY_KWARGS['embed_dims']]
    assert {s.blocks[0].gate.gamma for s in model.stages} == {2}
    with pytest.raises(ValueError, match='gamma has 3 entries but depths has 4'):
        timm.create_model('posmlp_t', **dict(TINY_KWARGS, gamma=(2, 2, 4)))


def test_unpooled_output_cannot_feed_a_head():
    with pytest.raises(ValueError, match=r"global_pool=''.*5-class head.*num_classes=0"):
        timm.create_model('posmlp_t', global_pool='', num_classes=5, **TINY_KWARGS)
    model = timm.create_model('posmlp_t', global_pool='', num_classes=0, **TINY_KWARGS)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 32, 1, 1)
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(10)
    model.reset_classifier(10, 'avg')
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def _save_project_checkpoint(model, path, model_name, model_kwargs, ema=None):
    models.save_checkpoint_file(dict(
        epoch=3, model_name=model_name, model_kwargs=model_kwargs, state_dict=model.state_dict(),
        state_dict_ema=ema, args=dict(lr=0.1, model=model_name), metric=50.0, version=2), str(path))


def test_project_checkpoint_round_trip(tmp_path):
    kwargs = dict(TINY_KWARGS, num_classes=4, gate='lrpe')
    model = timm.create_model('posmlp_t', **kwargs).eval()
    ema = timm.create_model('posmlp_t', **kwargs).state_dict()
    path = tmp_path / 'ckpt.pth.tar'
    _save_project_checkpoint(model, path, 'posmlp_t', kwargs, ema)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        live = models.create_model_from_checkpoint(str(path), use_ema=False).eval()
        torch.testing.assert_close(live(x), model(x))
        default = models.create_model_from_checkpoint(str(path)).eval()
        reference = timm.create_model('posmlp_t', **kwargs).eval()
        reference.load_state_dict(ema)
        torch.testing.assert_close(default(x), reference(x))
        overlay = dict(file=str(path), num_classes=4)
        via_timm = timm.create_model('posmlp_t', pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
        torch.testing.assert_close(via_timm(x), reference(x))


def test_checkpoint_of_another_architecture_names_the_keys(tmp_path):
    model = timm.create_model('posmlp_t', num_classes=4, **TINY_KWARGS)
    path = tmp_path / 'tiny.pth.tar'
    _save_project_checkpoint(model, path, 'posmlp_t', dict(TINY_KWARGS, num_classes=4))
    with pytest.raises(CheckpointError, match=r'missing keys: .*unexpected keys: '):
        models.create_model_from_checkpoint(str(path), model_name='posmlp_t', num_classes=4,
                                            **dict(TINY_KWARGS, depths=(1, 1, 2, 1)), gate='sgu')


def test_head_of_another_class_count_needs_finetune(tmp_path, caplog):
    model = timm.create_model('posmlp_t', num_classes=4, **TINY_KWARGS)
    path = tmp_path / 'tiny.pth.tar'
    _save_project_checkpoint(model, path, 'posmlp_t', dict(TINY_KWARGS, num_classes=4))
    with pytest.raises(CheckpointError, match=r'4-class head.*finetune=True.*--model-kwargs num_classes=4\)'):
        models.create_model_from_checkpoint(str(path), num_classes=9)
    finetuned = models.create_model_from_checkpoint(str(path), num_classes=9, finetune=True)
    assert finetuned.head.out_features == 9 and 'head dropped' in caplog.text
    torch.testing.assert_close(finetuned.stem.conv1.weight, model.stem.conv1.weight)


@pytest.mark.parametrize('finetune', [False, True])
def test_headless_backbone_takes_all_weights_but_the_head(tmp_path, caplog, finetune):
    model = timm.create_model('posmlp_t', num_classes=4, **TINY_KWARGS).eval()
    path = tmp_path / 'tiny.pth.tar'
    _save_project_checkpoint(model, path, 'posmlp_t', dict(TINY_KWARGS, num_classes=4))
    backbone = models.create_model_from_checkpoint(str(path), use_ema=False, num_classes=0, finetune=finetune).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), model.forward_head(model.forward_features(x), pre_logits=True))
    assert 'head' not in caplog.text


def test_checkpoint_of_another_timm_model_is_built_by_its_recorded_name(tmp_path):
    model = timm.create_model('test_resnet', num_classes=10).eval()
    path = tmp_path / 'resnet.pth.tar'
    _save_project_checkpoint(model, path, 'test_resnet', dict(num_classes=10))
    rebuilt = models.create_model_from_checkpoint(str(path)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    # Its classifier is `fc`: a backbone drops it, another class count is named as such.
    assert models.create_model_from_checkpoint(str(path), num_classes=0).num_classes == 0
    with pytest.raises(CheckpointError, match='10-class head but the model has 3 classes'):
        models.create_model_from_checkpoint(str(path), num_classes=3)


def test_bare_weights_of_another_model_point_to_the_model_name(tmp_path):
    path = tmp_path / 'resnet.pth'
    torch.save(timm.create_model('test_resnet', num_classes=10).state_dict(), path)
    # They describe no architecture, so no argument can have changed it: the model name is what to fix.
    with pytest.raises(CheckpointError, match=r'another architecture.*Pass model_name \(validate.py: --model\)') \
            as error:
        models.create_model_from_checkpoint(str(path), model_name='test_efficientnet', num_classes=10, drop_rate=0.1)
    assert 'change the architecture' not in str(error.value)
    with pytest.raises(CheckpointError, match=r'resnet.pth records no model name, and these weights are not a '
                                              r'PosMLP model .*Pass model_name \(validate.py: --model\)'):
        models.create_model_from_checkpoint(str(path))


def test_naming_the_recorded_model_keeps_its_recorded_arguments(tmp_path):
    kwargs = dict(TINY_KWARGS, num_classes=4)
    model = timm.create_model('posmlp_t', **kwargs).eval()
    path = tmp_path / 'tiny.pth.tar'
    _save_project_checkpoint(model, path, 'posmlp_t', kwargs)
    rebuilt = models.create_model_from_checkpoint(str(path), model_name='posmlp_t', use_ema=False)
    assert rebuilt.num_classes == 4 and rebuilt.stages[0].blocks[0].norm.weight.shape == (8,)
    # Another architecture is named as such, with no class-count hint, and says how to get the right one.
    wrong_model = 'another architecture.*Leave out model_name .*--model.* posmlp_t'
    with pytest.raises(CheckpointError, match=wrong_model) as error:
        models.create_model_from_checkpoint(str(path), model_name='posmlp_s', num_classes=4)
    assert 'class' not in str(error.value)
    # Only the arguments that shape the weights are named; regularisation and the gate's implementation don't.
    with pytest.raises(CheckpointError, match=r'another architecture.*arguments embed_dims \(validate.py: '
                                              r'--model-kwargs\).* leave them out'):
        models.create_model_from_checkpoint(str(path), embed_dims=(8, 16, 16, 64), drop_rate=0.1,
                                            drop_path_rate=0.1, gate_impl='reference')


def test_weights_of_another_architecture_given_to_a_built_model_point_to_its_options():
    # train.py --initial-checkpoint builds its --model itself: no architecture is inferred there.
    weights = timm.create_model('posmlp_t', num_classes=4, **TINY_KWARGS).state_dict()
    model = timm.create_model('posmlp_t', num_classes=4, **dict(TINY_KWARGS, depths=(1, 1, 2, 1)))
    build_options = 'another architecture.*train.py: the --model and --model-kwargs'
    with pytest.raises(CheckpointError, match=build_options) as error:
        models.load_weights(model, weights, finetune=True)
    assert 'Leave out' not in str(error.value)


def test_head_of_another_input_width_is_named_by_its_shape():
    model = timm.create_model('posmlp_t', num_classes=4, **TINY_KWARGS)
    weights = dict(model.state_dict(), **{'head.weight': torch.zeros(4, 16)})
    shapes = r'takes \(16,\) features but the model.s takes \(32,\).*\(4, 16\) vs \(4, 32\)'
    with pytest.raises(CheckpointError, match=shapes):
        models.load_weights(model, weights)


def test_ema_asked_of_a_checkpoint_without_names_the_argument_and_the_option():
    with pytest.raises(CheckpointError, match=r'use_ema=None or False \(validate.py: leave out --use-ema\)'):
        models.select_state_dict({'state_dict': {}}, use_ema=True)


def test_feature_backbone_from_a_checkpoint_has_its_weights(caplog):
    path = str(reference_path('gqpe_tiny_original_checkpoint.pth.tar'))
    with caplog.at_level('INFO', logger='timm'):
        features = models.create_model_from_checkpoint(path, features_only=True, out_indices=(1, 3)).eval()
    # timm loads every weight it is given, and reports none as missing (the head is left out on both sides).
    assert 'Loading pretrained weights' in caplog.text and 'keys' not in caplog.text
    model = models.create_model_from_checkpoint(path).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=(1, 3), intermediates_only=True)
        for got, want in zip(features(x), expected, strict=True):
            torch.testing.assert_close(got, want)
    assert features.pretrained_cfg['input_size'] == (3, 224, 224) and 'state_dict' not in features.pretrained_cfg


def test_data_config_of_a_checkpoint_model_is_the_one_it_was_trained_with(tmp_path):
    kwargs = dict(TINY_KWARGS, num_classes=4)  # img_size=32
    path = tmp_path / 'tiny.pth.tar'
    models.save_checkpoint_file(dict(
        model_name='posmlp_t', model_kwargs=kwargs, state_dict=timm.create_model('posmlp_t', **kwargs).state_dict(),
        args=dict(img_size=None, input_size=None, crop_pct=1.0, interpolation='bilinear', mean=[0.5] * 3, std=None)),
        str(path))
    config = timm.data.resolve_data_config({}, model=models.create_model_from_checkpoint(str(path)))
    assert config['input_size'] == (3, 32, 32) and config['crop_pct'] == 1.0
    assert config['interpolation'] == 'bilinear' and config['mean'] == (0.5,) * 3
    assert config['std'] == timm.data.IMAGENET_DEFAULT_STD  # not recorded: the model's own
    config = timm.data.resolve_data_config({}, model=models.create_model_from_checkpoint(str(path), img_size=64))
    assert config['input_size'] == (3, 64, 64)  # a size given now builds the model for it


class _RunsCode:
    """Unpickles by calling `function(*args)`."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize('call', ['open', 'os.system'])  # torch words its refusals of the two differently
def test_pickle_that_would_run_code_is_refused(tmp_path, call):
    marker = tmp_path / 'code_ran'
    path = tmp_path / 'evil.pth.tar'
    model = timm.create_model('posmlp_t', num_classes=4, **TINY_KWARGS)
    payload = _RunsCode(open, str(marker), 'w') if call == 'open' else _RunsCode(os.system, f'touch {marker}')
    torch.save({'state_dict': model.state_dict(), 'payload': payload}, path)
    with pytest.raises(CheckpointError, match=r'refusing .* would call \S*(open|system), i.e. run code'):
        models.create_model_from_checkpoint(str(path))
    overlay = dict(file=str(path), num_classes=4)
    with pytest.raises(Exception, match='(?i)weights.only'):
        timm.create_model('posmlp_t', pretrained=True, pretrained_cfg_overlay=overlay, num_classes=4, **TINY_KWARGS)
    assert not marker.exists()


@pytest.mark.parametrize('content', [
    b'<!DOCTYPE html><html><body>Sign in to download</body></html>',  # a failed download saved as the file
    b'',
])
def test_file_that_is_not_a_checkpoint_is_named_as_such(tmp_path, content):
    path = tmp_path / 'posmlp_t.pth.tar'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match='is not a PyTorch checkpoint') as error:
        models.load_checkpoint_file(str(path))
    assert 'refusing' not in str(error.value) and 'head -c' in str(error.value)


@pytest.mark.parametrize('size', [100, 5000, 100_000])  # torch fails differently at each: bad zip, EINVAL, ...
def test_truncated_checkpoint_is_named_as_such(tmp_path, size):
    path = tmp_path / 'cut.pth.tar'
    path.write_bytes(reference_path('gqpe_tiny_original_checkpoint.pth.tar').read_bytes()[:size])
    with pytest.raises(CheckpointError, match='looks like a truncated or incomplete PyTorch checkpoint'):
        models.load_checkpoint_file(str(path))


def test_mmap_reads_a_checkpoint_in_the_old_format_too(tmp_path):
    path = tmp_path / 'old.pth.tar'
    torch.save({'metric': 1.5, 'w': torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    assert models.load_checkpoint_file(str(path), mmap=True)['metric'] == 1.5


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match='does not exist'):
        models.create_model_from_checkpoint(str(tmp_path / 'nope.pth.tar'))


def test_saved_checkpoint_is_readable_by_others_as_the_umask_allows(tmp_path, monkeypatch):
    # A fixed umask, so the test does not depend on the one it runs under.
    monkeypatch.setattr(models.checkpoint, 'PROCESS_UMASK', 0o022)
    path = tmp_path / 'last.pth.tar'
    models.save_checkpoint_file({'epoch': 1}, str(path))
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / 'last.pth.tar'
    models.save_checkpoint_file({'epoch': 1}, str(path))

    def crash(obj, f, *args, **kwargs):
        f.write(b'partial')
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        models.save_checkpoint_file({'epoch': 2}, str(path))
    monkeypatch.undo()
    assert models.load_checkpoint_file(str(path)) == {'epoch': 1}
    assert os.listdir(tmp_path) == ['last.pth.tar']


@pytest.mark.parametrize('name', ['posmlp_t', 'posmlp_t_lrpe', 'posmlp_t_sgu', 'vip_s7', 'eamlp_14'])
def test_timms_device_and_dtype_arguments_place_the_model(name):
    on_meta = timm.create_model(name, device='meta')
    assert {t.device.type for t in (*on_meta.parameters(), *on_meta.buffers())} == {'meta'}
    cast = timm.create_model(name, dtype=torch.bfloat16)
    assert {p.dtype for p in cast.parameters()} == {torch.bfloat16}


def test_a_bfloat16_posmlp_runs():
    model = timm.create_model('posmlp_t', dtype=torch.bfloat16, num_classes=3, **TINY_KWARGS).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
