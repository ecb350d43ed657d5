"""Checkpoints are data: what one records never makes the scripts load other weights, read other files or
reach the network; the scripts run timm and the hub client offline; a missing checkpoint is named on
every route the README shows."""
import ast
import logging
import os
import subprocess
import sys

import pytest
import timm
import torch

from conftest import ROOT, TINY_KWARGS, make_image_folder

import inference
import models
import train
import validate
from models import CheckpointError
from models.checkpoint import recorded_model_kwargs

pytestmark = pytest.mark.usefixtures('in_process_run')

FAST = ['-b', '4', '-j', '0', '--threads', '1', '--warmup-epochs', '0', '--cooldown-epochs', '0']


def save_checkpoint_recording(path, **recorded):
    """A 3-class TINY_KWARGS checkpoint whose recorded model arguments also hold `recorded`."""
    kwargs = dict(TINY_KWARGS, num_classes=3)
    model = timm.create_model('posmlp_t', **kwargs)
    models.save_checkpoint_file({'state_dict': model.state_dict(), 'model_name': 'posmlp_t',
                                 'model_kwargs': dict(kwargs, **recorded)}, str(path))
    return path


@pytest.fixture
def files_read(monkeypatch):
    """The paths torch.load reads, and a hub download that fails the test if it is tried."""
    read = []
    real_load = torch.load

    def load(f, *args, **kwargs):
        read.append(str(f))
        return real_load(f, *args, **kwargs)

    def download(*args, **kwargs):
        raise AssertionError(f'the Hugging Face Hub was asked for {args} {kwargs}')

    monkeypatch.setattr(torch, 'load', load)
    monkeypatch.setattr(timm.models._hub, 'hf_hub_download', download)
    return read


def recorded_cases(tmp_path):
    other = tmp_path / 'other.pth.tar'  # missing: reading it fails; and nothing may read it anyway
    return {
        'pretrained_file': dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(other))),
        'pretrained_hub': dict(pretrained=True, pretrained_cfg_overlay=dict(source='hf-hub',
                                                                            hf_hub_id='timm/posmlp_t.in1k')),
        'pretrained_cfg': dict(pretrained=True, pretrained_cfg=dict(file=str(other), num_classes=3)),
        'checkpoint_path': dict(checkpoint_path=str(other)),
    }


@pytest.mark.parametrize('case', ['pretrained_file', 'pretrained_hub', 'pretrained_cfg', 'checkpoint_path'])
def test_validate_drops_recorded_arguments_that_would_load_other_weights(tmp_path, capsys, files_read, case):
    recorded = recorded_cases(tmp_path)[case]
    checkpoint = save_checkpoint_recording(tmp_path / 'crafted.pth.tar', **recorded)
    data = make_image_folder(tmp_path / 'data', per_class=1, splits=('val',))
    assert validate.main([str(data), '--checkpoint', str(checkpoint), '-j', '0']) == 0
    out = capsys.readouterr().out
    assert f'{checkpoint}: recorded model arguments {", ".join(recorded)} ignored' in out
    assert set(files_read) == {str(checkpoint)}


def test_a_bare_resume_drops_recorded_arguments_that_would_load_other_weights(tmp_path, capsys, caplog, files_read):
    data = make_image_folder(tmp_path / 'data', per_class=2)
    assert train.main([str(data), '--model-kwargs', *[f'{k}={v!r}' for k, v in TINY_KWARGS.items()], *FAST,
                       '--epochs', '1', '--output', str(tmp_path / 'out'), '--experiment', 'run']) == 0
    last = tmp_path / 'out' / 'run' / 'last.pth.tar'
    state = torch.load(last, weights_only=True)
    other = str(tmp_path / 'other.pth.tar')
    state['args']['model_kwargs'].update(pretrained=True, pretrained_cfg_overlay=dict(file=other))
    state['args'].update(initial_checkpoint=other, log_wandb=True)
    models.save_checkpoint_file(state, str(last))
    files_read.clear()
    capsys.readouterr()

    with caplog.at_level(logging.WARNING):
        assert train.main(['--resume', str(last), '--epochs', '2']) == 0
    out = capsys.readouterr()
    # Said while the options are read, before the run's log exists, and written into it once it does.
    dropped = 'recorded model arguments pretrained, pretrained_cfg_overlay ignored'
    assert dropped in out.out and dropped in (tmp_path / 'out' / 'run' / 'train.log').read_text()
    assert other not in files_read and 'wandb' not in out.out
    resumed = torch.load(last, weights_only=True)
    assert resumed['epoch'] == 1 and resumed['model_kwargs']['embed_dims'] == list(TINY_KWARGS['embed_dims'])
    assert 'pretrained' not in resumed['model_kwargs'] and resumed['args']['initial_checkpoint'] == ''


@pytest.mark.parametrize('recorded', [dict(mean=0.5), dict(interpolation='wobbly'), dict(crop_pct='x'),
                                      dict(input_size=[3, 'a', 32]), dict(std=[0.2, 0.0, 0.2]), dict(img_size=-1)])
def test_recorded_input_options_no_transform_can_use_are_ignored(tmp_path, capsys, recorded):
    checkpoint = tmp_path / 'crafted.pth.tar'
    model = timm.create_model('posmlp_t', num_classes=3, **TINY_KWARGS)
    models.save_checkpoint_file({'state_dict': model.state_dict(), 'model_name': 'posmlp_t',
                                 'model_kwargs': dict(TINY_KWARGS, num_classes=3),
                                 'args': {'input_size': [3, 32, 32], **recorded}}, str(checkpoint))
    data = make_image_folder(tmp_path / 'data', per_class=1, splits=('val',))
    assert validate.main([str(data), '--checkpoint', str(checkpoint), '-j', '0']) == 0
    out = capsys.readouterr().out
    assert f'{checkpoint}: recorded input options {next(iter(recorded))}=' in out and 'ignored' in out


def test_recorded_model_arguments_keep_the_architecture_only(caplog):
    recorded = dict(
        embed_dims=[8, 16], gate='lrpe', global_pool='avg', mlp_ratio=2.5, generalized=False, drop_rate=None,
        pretrained=True, features_only=True, out_indices=(1,), cache_dir='cache',
        act_layer='hf-hub:someone/act', norm_layer='/tmp/norm.py', extra=dict(weights='w.safetensors'),
        pos=['a', 'https://example.com/x'], tensor=torch.zeros(1),
    )
    with caplog.at_level(logging.WARNING):
        kept = recorded_model_kwargs(recorded, 'crafted.pth.tar')
    assert kept == dict(embed_dims=[8, 16], gate='lrpe', global_pool='avg', mlp_ratio=2.5, generalized=False,
                        drop_rate=None)
    assert ('crafted.pth.tar: recorded model arguments pretrained, features_only, out_indices, cache_dir, act_layer, '
            'norm_layer, extra, pos, tensor ignored') in caplog.text
    assert recorded_model_kwargs(['not', 'a', 'mapping'], 'x') == {} and recorded_model_kwargs(None, 'x') == {}


@pytest.mark.parametrize('given', [dict(pretrained=True), dict(checkpoint_path='other.pth.tar'),
                                   dict(pretrained_cfg=dict(file='other.pth.tar'))])
def test_arguments_that_load_other_weights_are_refused(tmp_path, capsys, given):
    checkpoint = save_checkpoint_recording(tmp_path / 'plain.pth.tar')
    with pytest.raises(CheckpointError, match='would load other weights'):
        models.create_model_from_checkpoint(str(checkpoint), **given)
    with pytest.raises(SystemExit):
        train.main(['data', '--model-kwargs', *[f'{k}={v!r}' for k, v in given.items()]])
    assert 'nothing is downloaded' in capsys.readouterr().err


def test_a_feature_backbone_takes_the_checkpoints_weights_whatever_the_overlay_says(tmp_path, files_read):
    checkpoint = save_checkpoint_recording(tmp_path / 'plain.pth.tar')
    overlay = dict(source='hf-hub', hf_hub_id='timm/posmlp_t.in1k', file=str(tmp_path / 'other.pth.tar'))
    backbone = models.create_model_from_checkpoint(str(checkpoint), features_only=True, pretrained_cfg_overlay=overlay)
    assert len(backbone(torch.randn(1, 3, 32, 32))) == 4 and set(files_read) == {str(checkpoint)}


SCRIPTS = ('train', 'validate', 'benchmark', 'inference', 'clean_checkpoint', 'avg_checkpoints', 'export_hub',
           'onnx_export', 'utils.ablation', 'utils.visualize')


def test_the_hub_client_runs_offline_once_a_script_is_imported():
    env = {k: v for k, v in os.environ.items() if not k.endswith('_OFFLINE')}
    probe = 'import train, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)'
    result = subprocess.run([sys.executable, '-c', probe], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'True'


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_script_goes_offline_before_it_imports_anything_that_may_reach_the_hub(script):
    tree = ast.parse((ROOT / (script.replace('.', '/') + '.py')).read_text())
    imported = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.append(node.module)
    stdlib = set(sys.stdlib_module_names)
    first = next(name for name in imported if name.split('.')[0] not in stdlib)
    assert first == 'utils.offline', f'{script} imports {first} before utils.offline'


def test_a_missing_checkpoint_is_named_on_every_route_the_readme_shows(tmp_path, capsys):
    missing = str(tmp_path / 'posmlp_t.pth.tar')
    with pytest.raises(FileNotFoundError, match='pretrained_cfg_overlay names does not exist') as error:
        timm.create_model('posmlp_t', pretrained=True, pretrained_cfg_overlay=dict(file=missing))
    assert missing in str(error.value)
    for kwargs in ({}, dict(use_ema=False), dict(features_only=True)):
        with pytest.raises(CheckpointError, match=f"checkpoint '{missing}' does not exist"):
            models.create_model_from_checkpoint(missing, **kwargs)
    data = make_image_folder(tmp_path / 'data', per_class=1, splits=('val',))
    assert validate.main([str(data), '--checkpoint', missing, '-j', '0']) == 1
    assert f"checkpoint '{missing}' does not exist" in capsys.readouterr().out


@pytest.mark.parametrize('given, reason, origin', [
    (['--model-kwargs', 'foo=1'], "unexpected keyword argument 'foo'", 'the arguments foo (--model-kwargs) given'),
    (['--model-kwargs', "gate='nope'"], "gate='nope' is not one of", 'the arguments gate (--model-kwargs) given'),
    (['--model', 'posmlp_t.evil_tag'], 'Invalid pretrained tag', 'model_name (--model) given'),
])
def test_a_model_the_command_line_cannot_build_is_one_line(tmp_path, capsys, given, reason, origin):
    checkpoint = save_checkpoint_recording(tmp_path / 'c.pth.tar')
    data = make_image_folder(tmp_path / 'data', per_class=1, splits=('val',))
    assert validate.main([str(data), '--checkpoint', str(checkpoint), '-j', '0', *given]) == 1
    out = capsys.readouterr().out
    stopped = [line for line in out.splitlines() if 'Stopped:' in line]
    assert len(stopped) == 1 and 'Traceback' not in out
    assert reason in stopped[0] and f'{origin} over what {checkpoint} records' in stopped[0]


@pytest.mark.parametrize('name, recorded, reason', [
    ('posmlp_t', dict(foo=1), "unexpected keyword argument 'foo'"),
    ('vip_s7', {}, "unexpected keyword argument 'depths'"),
    ('posmlp_t.evil_tag', {}, 'Invalid pretrained tag'),
    ('posmlp_t', dict(embed_dims=(8, 16, 16, 10 ** 6)), 'it needs more memory than this machine has'),
])
def test_a_model_a_checkpoint_records_but_that_cannot_be_built_is_one_line(tmp_path, capsys, name, recorded, reason):
    path = tmp_path / 'crafted.pth.tar'
    checkpoint = models.load_checkpoint_file(str(save_checkpoint_recording(path)))
    models.save_checkpoint_file(dict(checkpoint, model_name=name,
                                     model_kwargs=dict(checkpoint['model_kwargs'], **recorded)), str(path))
    images = make_image_folder(tmp_path / 'data', per_class=1, splits=('val',)) / 'val'
    assert inference.main([str(images), '--checkpoint', str(path), '-j', '0']) == 1
    out = capsys.readouterr().out
    stopped = [line for line in out.splitlines() if 'Stopped:' in line]
    assert len(stopped) == 1 and 'Traceback' not in out
    assert f"model {name!r} cannot be built" in stopped[0] and reason in stopped[0]
    assert f'as {path} records them' in stopped[0] and '--model, --model-kwargs' in stopped[0]
