"""The comparison table's models: ViP, EAMLP and ResMLP-B24. Exact parameter counts, the authors' fixtures
through timm's pretrained route and the project's loader, timm conventions, sizes, training and evaluation."""
import json
import re
import subprocess

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3

import models
import train
import validate
from models import CheckpointError
from utils.args import parse_train_args
from conftest import ROOT, make_image_folder, reference_path, script_env

pytestmark = pytest.mark.usefixtures('in_process_run')

# Small models for fast tests: ViP at 56 px (patch 7: maps 8, 4, 4, 4, which segment_dim must equal).
VIP_TINY = dict(img_size=56, layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), segment_dim=(8, 4, 4, 4))
EAMLP_TINY = dict(img_size=32, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2., token_dim=16)
RESMLP_TINY = dict(img_size=32, num_blocks=3, embed_dim=32)
TINY = dict(vip_s7=VIP_TINY, eamlp_14=EAMLP_TINY, resmlp_b24_224=RESMLP_TINY)
FAST = ['-b', '4', '-j', '0', '--threads', '1', '--warmup-epochs', '0', '--cooldown-epochs', '0', '--epochs', '1',
        '--max-steps-per-epoch', '2']


def model_args(kwargs: dict) -> list:
    return ['--model-kwargs', *[f'{k}={v!r}' for k, v in kwargs.items() if k != 'img_size'],
            '--img-size', str(kwargs['img_size'])]


def fixture(name: str):
    io = torch.load(reference_path(f'{name}_io.pt'), map_location='cpu', weights_only=True)
    return reference_path(f'{name}_original_checkpoint.pth.tar'), io


def vip_fixture_kwargs() -> dict:
    return json.loads(reference_path('vip_tiny_config.json').read_text())


def eamlp_fixture_kwargs() -> dict:
    cfg = json.loads(reference_path('eamlp_tiny_config.json').read_text())
    return {k: cfg[k] for k in ('embed_dim', 'depth', 'num_heads', 'mlp_ratio', 'token_dim', 'num_classes')}


def parameter_count(name: str, **kwargs) -> int:
    with torch.device('meta'):
        model = timm.create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('name,count', [
    ('vip_s7', 25_114_984), ('vip_m7', 55_272_488), ('vip_l7', 87_784_936), ('vip_s14', 29_892_904),
    ('resmlp_b24_224', 115_736_776),
])
def test_parameter_counts_match_the_authors(name, count):
    assert parameter_count(name) == count


@pytest.mark.parametrize('name,count', [('eamlp_14', 29_801_422), ('eamlp_19', 54_470_798)])
def test_eamlp_trainable_counts_as_the_authors_count_them(name, count):
    """The authors' count is every trainable tensor their model holds: the two token modules' linear_1.weight
    (128 x 64 each) counted apart from the linear_0.weight it is the transpose of. Tied, it is no parameter of
    its own here; untied, the counts agree. The fixed position table is not trainable in either."""
    tied_readouts = 2 * 128 * 64
    assert parameter_count(name) == count - tied_readouts
    assert parameter_count(name, tied_token_weights=False) == count


def read_layouts(name: str) -> dict:
    """{model: {key: shape}} of the full-size models, as the authors' code names their state dicts."""
    layouts, current = {}, None
    for line in reference_path(f'{name}_state_dict_layout.txt').read_text().splitlines():
        if line.startswith('#'):
            current = layouts.setdefault(line[2:].split(':')[0], {})
        else:
            key, shape, _ = line.split('\t')
            current[key] = torch.Size(json.loads(shape.replace('(', '[').replace(',)', ']').replace(')', ']')))
    return layouts


@pytest.mark.parametrize('layout', ['vip', 'eamlp'])
def test_full_size_state_dicts_have_the_authors_keys_and_shapes(layout):
    module = models.vip if layout == 'vip' else models.eamlp
    layouts = read_layouts(layout)
    assert set(layouts) == set(module.VARIANTS)
    for name, shapes in layouts.items():
        # Real (zero) tensors where the reader compares values: EAMLP's stem, whose memories it checks are tied.
        theirs = {k: torch.zeros(shape, device='cpu' if k.startswith('tokens_to_token') else 'meta')
                  for k, shape in shapes.items()}
        with torch.device('meta'):
            model = timm.create_model(name)
        ours = {k: v.shape for k, v in model.state_dict().items()}
        assert {k: v.shape for k, v in module.checkpoint_filter_fn(theirs).items()} == ours, name
        assert module.read_architecture(theirs)[0] == name


def test_vip_fixture_logits_through_timm_pretrained():
    path, io = fixture('vip_tiny')
    kwargs = vip_fixture_kwargs()
    overlay = dict(file=str(path), num_classes=kwargs['num_classes'])
    model = timm.create_model('vip_s7', pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(io['input']), io['logits'], atol=1e-4, rtol=0)


def test_vip_fixture_logits_through_the_project_loader():
    path, io = fixture('vip_tiny')
    # Their checkpoint records arch 'vip_tiny', which is no model: the architecture comes from the weights.
    assert not timm.is_model(models.load_checkpoint_file(str(path))['arch'])
    model = models.create_model_from_checkpoint(str(path)).eval()
    assert model.segment_dim == (32, 16, 16, 16) and model.transitions[:3] == (True, False, False)
    assert type(model.stages[3].downsample.proj) is torch.nn.Conv2d and model.stages[3].downsample.proj.stride == (1, 1)
    assert model.pretrained_cfg['input_size'] == (3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(io['input']), io['logits'], atol=1e-4, rtol=0)


@pytest.mark.parametrize('use_ema', [False, True])
def test_eamlp_fixture_logits_through_timm_pretrained(use_ema, tmp_path):
    path, io = fixture('eamlp_tiny')
    if not use_ema:  # timm's route takes the EMA weights when there are any: give it a file of live ones
        live = tmp_path / 'live.pth.tar'
        torch.save({'state_dict': models.load_checkpoint_file(str(path))['state_dict']}, live)
        path = live
    kwargs = eamlp_fixture_kwargs()
    overlay = dict(file=str(path), num_classes=kwargs['num_classes'])
    model = timm.create_model('eamlp_14', pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(io['input']), io['logits_ema' if use_ema else 'logits'], atol=1e-4, rtol=0)


@pytest.mark.parametrize('use_ema', [False, True])
def test_eamlp_fixture_logits_through_the_project_loader(use_ema):
    path, io = fixture('eamlp_tiny')
    assert not timm.is_model(models.load_checkpoint_file(str(path))['arch'])  # 'T2t_vit_tiny'
    model = models.create_model_from_checkpoint(str(path), use_ema=use_ema).eval()
    assert model.embed_dim == 64 and len(model.blocks) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(io['input']), io['logits_ema' if use_ema else 'logits'], atol=1e-4, rtol=0)


def test_eamlp_position_table_is_the_authors():
    path, _ = fixture('eamlp_tiny')
    stored = models.load_checkpoint_file(str(path))['state_dict']['pos_embed']
    assert torch.equal(timm.create_model('eamlp_14', **eamlp_fixture_kwargs()).pos_embed, stored)


def test_eamlp_token_memories_stay_transposes_through_training():
    torch.manual_seed(0)
    model = timm.create_model('eamlp_14', num_classes=3, **EAMLP_TINY)
    attn = model.tokens_to_token.attention1.attn
    state = model.state_dict()
    prefix = 'tokens_to_token.attention1.attn.'
    assert torch.equal(state[prefix + 'linear_1.weight'], state[prefix + 'linear_0.weight'].t())
    assert not any(p is attn.linear_0.weight for n, p in attn.named_parameters() if n != 'linear_0.weight')

    # The gradient of the one memory is the sum over both its uses: that of an untied copy's two.
    untied = timm.create_model('eamlp_14', num_classes=3, tied_token_weights=False, **EAMLP_TINY)
    untied.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    for m in (model, untied):
        m.eval()
        F.cross_entropy(m(x), torch.tensor([0, 2])).backward()
    twin = untied.tokens_to_token.attention1.attn
    torch.testing.assert_close(attn.linear_0.weight.grad, twin.linear_0.weight.grad + twin.linear_1.weight.grad.t())

    model.train()
    optimizer = timm.optim.create_optimizer_v2(model, 'adamw', lr=1e-2, weight_decay=0.05)
    ema = ModelEmaV3(model, decay=0.5)
    before = attn.linear_0.weight.detach().clone()
    ema_before = ema.module.tokens_to_token.attention1.attn.linear_0.weight.detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), torch.tensor([0, 2])).backward()
        optimizer.step()
    assert not torch.equal(attn.linear_0.weight, before)
    state = model.state_dict()
    assert torch.equal(state[prefix + 'linear_1.weight'], state[prefix + 'linear_0.weight'].t())
    # timm's EMA lerps every state-dict entry in place: the stored linear_1.weight must not reach linear_0 again.
    ema.update(model)
    expected = 0.5 * ema_before + 0.5 * attn.linear_0.weight.detach()
    torch.testing.assert_close(ema.module.tokens_to_token.attention1.attn.linear_0.weight, expected)


def test_eamlp_checkpoint_with_untied_memories_loads_untied(tmp_path, caplog):
    """The authors' GPU runs trained linear_0 and linear_1 apart (moving the model to the GPU copies them
    apart), so a checkpoint may hold two that differ: both routes build a model that keeps both."""
    path, io = fixture('eamlp_tiny')
    checkpoint = models.load_checkpoint_file(str(path))
    untied_state = dict(checkpoint['state_dict'])
    key = 'tokens_to_token.attention2.attn.linear_1.weight'
    untied_state[key] = torch.randn_like(untied_state[key])
    untied_path = tmp_path / 'untied.pth.tar'
    torch.save({'state_dict': untied_state, 'args': checkpoint['args']}, untied_path)

    loaded = models.create_model_from_checkpoint(str(untied_path)).eval()
    attn = loaded.tokens_to_token.attention2.attn
    assert not attn.tied and torch.equal(attn.readout_weight(), untied_state[key])
    # The untied form computes the authors' function on tied weights too.
    untied = models.create_model_from_checkpoint(str(path), use_ema=False, tied_token_weights=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(untied(io['input']), io['logits'], atol=1e-4, rtol=0)

    # timm's route: the module whose two differ unties itself, and says so; the other stays tied.
    overlay = dict(file=str(untied_path), num_classes=10)
    model = timm.create_model('eamlp_14', pretrained=True, pretrained_cfg_overlay=overlay,
                              **eamlp_fixture_kwargs()).eval()
    assert f'{key} is not the transpose of' in caplog.text and 'keeps its own linear_1.weight' in caplog.text
    assert model.tokens_to_token.attention1.attn.tied and not model.tokens_to_token.attention2.attn.tied
    assert torch.equal(model.tokens_to_token.attention2.attn.readout_weight(), untied_state[key])
    with torch.no_grad():
        torch.testing.assert_close(model(io['input']), loaded(io['input']))
    with pytest.raises(RuntimeError, match=r'linear_1.weight is not the transpose of .*tied_token_weights=False'):
        timm.create_model('eamlp_14', pretrained=True, pretrained_cfg_overlay=overlay, tied_token_weights=True,
                          **eamlp_fixture_kwargs())


def test_weights_of_no_known_family_are_named_as_such(tmp_path):
    path = tmp_path / 'resmlp.pth'
    torch.save(timm.create_model('resmlp_b24_224', **RESMLP_TINY).state_dict(), path)
    with pytest.raises(CheckpointError, match='not a PosMLP model .*nor a ViP or an EAMLP'):
        models.create_model_from_checkpoint(str(path))


def test_vip_refuses_input_sizes_it_cannot_take():
    with pytest.raises(ValueError, match=r'ViP takes only 224x224 input .*not 256x256\. Use img_size=224'):
        timm.create_model('vip_s7', img_size=256)
    with pytest.raises(ValueError, match=r'not 112x112\. For 112x112 input, build it with segment_dim=\(16, 8, 8, 8\)'):
        timm.create_model('vip_s7', img_size=112)
    with pytest.raises(ValueError, match=r'segment_dim \(8, 8, 4, 4\) does not fit transitions'):
        timm.create_model('vip_s7', **dict(VIP_TINY, segment_dim=(8, 8, 4, 4)))
    with pytest.raises(ValueError, match=r'stage 1 has 30 channels, which do not split into segment_dim=4'):
        timm.create_model('vip_s7', **dict(VIP_TINY, embed_dims=(16, 30, 32, 32)))
    model = timm.create_model('vip_s7', **VIP_TINY)
    for size in ((64, 64), (56, 63), (57, 57)):  # the conv alone would take 57 and drop a row and a column
        with pytest.raises(ValueError, match=rf'ViP takes only 56x56 input .*not {size[0]}x{size[1]}\. Resize'):
            model(torch.randn(1, 3, *size))
    with pytest.raises(ValueError, match='takes only 56x56'):
        model.forward_intermediates(torch.randn(1, 3, 64, 64))


def test_eamlp_refuses_input_sizes_it_was_not_built_for():
    model = timm.create_model('eamlp_14', **EAMLP_TINY)
    with pytest.raises(ValueError, match=r'EAMLP takes only 32x32 input .*not 48x48.*img_size=48'):
        model(torch.randn(1, 3, 48, 48))
    assert timm.create_model('eamlp_14', **dict(EAMLP_TINY, img_size=48))(torch.randn(1, 3, 48, 48)).shape == (1, 1000)
    with pytest.raises(ValueError, match='square inputs only'):
        timm.create_model('eamlp_14', **dict(EAMLP_TINY, img_size=(32, 48)))


@pytest.mark.parametrize('name,channels,reductions,side', [
    ('vip_s7', [16, 32, 32, 32], [7, 14, 14, 14], None),
    ('eamlp_14', [32, 32], [16, 16], 2),
    ('resmlp_b24_224', [32, 32, 32], [16, 16, 16], 2),
])
def test_features_only_gives_the_stage_maps(name, channels, reductions, side):
    kwargs = TINY[name]
    backbone = timm.create_model(name, features_only=True, **kwargs).eval()
    assert backbone.feature_info.channels() == channels and backbone.feature_info.reduction() == reductions
    size = kwargs['img_size']
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, size, size))
    assert [tuple(m.shape) for m in maps] == [(2, c, size // r, size // r) for c, r in zip(channels, reductions)]


def test_vip_intermediates_are_the_stage_outputs():
    model = timm.create_model('vip_s7', **VIP_TINY).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        expected, tokens = [], model.stem(x)
        for stage in model.stages:
            tokens = stage(tokens)
            expected.append(tokens.permute(0, 3, 1, 2))
        assert [tuple(m.shape) for m in maps] == [(2, 16, 8, 8), (2, 32, 4, 4), (2, 32, 4, 4), (2, 32, 4, 4)]
        for got, want in zip(maps, expected):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(final, model.forward_features(x))
        nhwc = model.forward_intermediates(x, indices=[1], norm=True, output_fmt='NHWC', intermediates_only=True)
        torch.testing.assert_close(nhwc[0], maps[1].permute(0, 2, 3, 1))


@pytest.mark.parametrize('name', ['vip_s7', 'eamlp_14'])
def test_timm_model_interface(name):
    kwargs = TINY[name]
    model = timm.create_model(name, num_classes=5, **kwargs).eval()
    size = kwargs['img_size']
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
        torch.testing.assert_close(model.forward_head(feats), model(x))
    assert model.get_classifier().out_features == 5
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0, '')
    assert model(x).shape == feats.shape
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))


@pytest.mark.parametrize('name', ['vip_s7', 'eamlp_14'])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    kwargs = TINY[name]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, **kwargs).eval()
    x = torch.randn(2, 3, kwargs['img_size'], kwargs['img_size'])
    model(x).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)


def test_weight_decay_spares_what_the_authors_spared():
    vip = timm.create_model('vip_s7', **VIP_TINY)
    eamlp = timm.create_model('eamlp_14', **EAMLP_TINY)
    for model, decayed, spared in ((vip, 'stages.0.blocks.0.permute_mlp.mlp_h.weight', 'stem.proj.bias'),
                                   (eamlp, 'tokens_to_token.attention1.attn.linear_0.weight', 'cls_token')):
        optimizer = timm.optim.create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
        decay_of = {id(p): g['weight_decay'] for g in optimizer.param_groups for p in g['params']}
        params = dict(model.named_parameters())
        assert decay_of[id(params[decayed])] == 0.05 and decay_of[id(params[spared])] == 0.0
    assert 'pos_embed' not in dict(eamlp.named_parameters())


@pytest.mark.parametrize('name', ['vip_s7', 'eamlp_14', 'resmlp_b24_224'])
def test_trains_and_evaluates_through_the_scripts(name, tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', per_class=4)
    out = tmp_path / 'out'
    assert train.main([str(data), '--model', name, *model_args(TINY[name]), *FAST, '--model-ema',
                       '--model-ema-decay', '0.5', '--output', str(out), '--experiment', 'run']) == 0
    run = out / 'run'
    row = (run / 'summary.csv').read_text().splitlines()[1].split(',')
    checkpoint = models.load_checkpoint_file(str(run / 'last.pth.tar'))
    assert checkpoint['model_name'] == name
    capsys.readouterr()
    assert validate.main([str(data), '--checkpoint', str(run / 'last.pth.tar'), '-j', '0']) == 0
    out_text = capsys.readouterr().out
    results = json.loads(out_text[out_text.index('{'):])
    header = (run / 'summary.csv').read_text().splitlines()[0].split(',')
    assert results['model'] == name and results['weights'] == 'state_dict_ema'
    assert results['top1'] == pytest.approx(float(row[header.index('ema_top1')]))
    assert results['loss'] == pytest.approx(float(row[header.index('ema_loss')]), rel=1e-5)


@pytest.mark.parametrize('name', ['vip_tiny', 'eamlp_tiny'])
def test_authors_checkpoints_evaluate_without_model_name(name, tmp_path, capsys):
    path, _ = fixture(name)
    data = make_image_folder(tmp_path / 'data', classes=tuple('abcdefghij'), per_class=1, splits=('val',))
    assert validate.main([str(data), '--checkpoint', str(path), '-j', '0']) == 0
    out = capsys.readouterr().out
    results = json.loads(out[out.index('{'):])
    assert results['model'] == ('vip_s7' if name == 'vip_tiny' else 'eamlp_14')
    assert results['images'] == 10 and results['input_size'] == [3, 224, 224] and results['crop_pct'] == 0.9
    assert re.search(r'top1 [\d.]+', out)


# ViP's README command line, as users type it (ViP's and PosMLP's READMEs give it with --model vip_s7).
VIP_COMMAND = (
    '--model vip_s7 -b 256 -j 8 --opt adamw --epochs 300 --sched cosine --apex-amp --img-size 224 --drop-path 0.1 '
    '--lr 2e-3 --weight-decay 0.05 --remode pixel --reprob 0.25 --aa rand-m9-mstd0.5-inc1 --smoothing 0.1 '
    '--mixup 0.8 --cutmix 1.0 --warmup-lr 1e-6 --warmup-epochs 20').split()


def test_vip_command_line_runs_on_two_processes(tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=8)
    overrides = ['-b', '2', '-j', '0', '--threads', '1', *model_args(VIP_TINY), '--epochs', '1',
                 '--max-steps-per-epoch', '2', '--output', str(tmp_path / 'out'), '--experiment', 'vip']
    result = subprocess.run(['bash', str(ROOT / 'distributed_train.sh'), '2', str(data), *VIP_COMMAND, *overrides],
                            cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'on cpu, 2 process(es)' in result.stdout and 'Model vip_s7' in result.stdout
    assert 'configs/vip_s7.yaml holds the recipe for vip_s7' in result.stdout
    assert 'Train: 0 [   2/2 (100%)]' in result.stdout
    checkpoint = models.load_checkpoint_file(str(tmp_path / 'out' / 'vip' / 'last.pth.tar'))
    assert checkpoint['model_name'] == 'vip_s7' and list(checkpoint['model_kwargs']['segment_dim']) == [8, 4, 4, 4]
    args = checkpoint['args']
    assert args['lr'] == 2e-3 and args['warmup_epochs'] == 20 and args['apex_amp'] is True and args['reprob'] == 0.25


def test_vip_command_line_at_another_size_names_the_segment_dim_to_give(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', per_class=1)
    tiny_widths = ['--model-kwargs', 'layers=(1,1,1,1)', 'embed_dims=(16,32,32,32)']
    code = train.main([str(data), *VIP_COMMAND, '--img-size', '56', *tiny_widths, '-j', '0',
                       '--output', str(tmp_path / 'out')])
    assert code != 0
    captured = capsys.readouterr()
    assert 'For 56x56 input, build it with segment_dim=(8, 4, 4, 4)' in captured.out + captured.err


@pytest.mark.parametrize('name', ['vip_s7', 'vip_m7', 'vip_l7', 'eamlp_14', 'eamlp_19'])
def test_configs_hold_the_authors_recipes(name):
    args = parse_train_args(['-c', str(ROOT / 'configs' / f'{name}.yaml'), 'data'])
    assert args.model == name and args.img_size == 224 and args.clip_grad is None and args.opt_eps == 1e-8
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    _, epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=1)
    assert epochs == 310 and args.min_lr == 1e-5  # the authors' logs have 310 epochs
    if name.startswith('vip'):
        recipe = (256, 2e-3, 0.05, 20, False, 0.875 if name == 'vip_l7' else 0.9)
    else:
        recipe = (64, 1e-3, 0.03, 5, True, 0.9)
    assert (args.batch_size, args.lr, args.weight_decay, args.warmup_epochs, args.model_ema, args.crop_pct) == recipe
    assert args.crop_pct == timm.models.get_pretrained_cfg(name).crop_pct  # the authors' eval crop
