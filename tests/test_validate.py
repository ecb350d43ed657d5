"""validate.py and eval.sh: project and authors' checkpoints, N processes, and bad input."""
import csv
import json
import re
import shutil
import subprocess

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import (
    ROOT, TINY_KWARGS, TINY_MODEL_ARGS, make_image_folder, reference_path, restored_process_state, script_env,
)
from tool_helpers import CLASS_TO_IDX, write_checkpoint

import models
import train
import validate
import utils.args
from utils.amp import resolve_precision
from utils.data import create_eval_transform, create_training_datasets, resolve_input_config
from utils.errors import DataError


pytestmark = pytest.mark.usefixtures('in_process_run')
FAST = ['-b', '4', '-j', '0', '--threads', '1', '--warmup-epochs', '0', '--cooldown-epochs', '0']


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
    """Two epochs with EMA, checkpoints ranked by the EMA model (what eval.sh evaluates by default)."""
    tmp = tmp_path_factory.mktemp('trained')
    data = make_image_folder(tmp / 'data', per_class=5)
    with restored_process_state():
        code = train.main([str(data), *TINY_MODEL_ARGS, *FAST, '--epochs', '2', '--model-ema',
                           '--model-ema-decay', '0.5', '--best-from-ema', '--output', str(tmp / 'out'),
                           '--experiment', 'run'])
    assert code == 0
    return data, tmp / 'out' / 'run'


def eval_sh(val_dir, checkpoint, *extra, num_proc=1) -> subprocess.CompletedProcess:
    env = script_env(NUM_PROC=str(num_proc))
    result = subprocess.run(['bash', str(ROOT / 'eval.sh'), str(val_dir), str(checkpoint), '-j', '0',
                             '--threads', '1', *extra], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_eval_sh_prints_the_top1_training_logged(trained_run, tmp_path):
    data, run = trained_run
    best = torch.load(run / 'model_best.pth.tar', weights_only=True)
    logged = re.search(rf'Epoch {best["epoch"]} done .*\| ema loss \S+  top1 (\S+) .*\(new best\)',
                       (run / 'train.log').read_text()).group(1)
    results_file = tmp_path / 'results.json'
    result = eval_sh(data / 'val', run / 'model_best.pth.tar', '--results-file', str(results_file))
    assert 'EMA weights (state_dict_ema)' in result.stdout
    assert f'top1 {logged} ' in result.stdout
    report = json.loads(results_file.read_text())
    results = report['results'][0]
    assert report['environment']['command'].startswith('python3 validate.py ') and report['environment']['torch']
    assert results['top1'] == best['metric'] and results['weights'] == 'state_dict_ema'
    assert results['images'] == 15 and results['params'] > 0 and results['img_per_sec'] > 0
    assert results['input_size'] == [3, 32, 32]


def test_bfloat16_and_channels_last_evaluate_close_to_float32(trained_run, capsys):
    data, run = trained_run
    numbers = []
    for extra in ([], ['--amp', '--amp-dtype', 'bfloat16', '--channels-last']):
        assert validate.main([str(data), '--checkpoint', str(run / 'last.pth.tar'), '-j', '0', *extra]) == 0
        out = capsys.readouterr().out
        numbers.append(json.loads(out[out.index('{'):]))
    assert numbers[1]['loss'] == pytest.approx(numbers[0]['loss'], rel=0.05)


def test_the_model_is_evaluated_fused_unless_no_reparam(trained_run, capsys, monkeypatch):
    data, run = trained_run
    fused_models = []
    original = timm.utils.reparameterize_model
    monkeypatch.setattr(utils.args, 'reparameterize_model',
                        lambda model, inplace: fused_models.append(original(model, inplace)) or fused_models[-1])
    numbers = []
    for extra in ([], ['--no-reparam']):
        assert validate.main([str(data), '--checkpoint', str(run / 'last.pth.tar'), '-j', '0', *extra]) == 0
        out = capsys.readouterr().out
        numbers.append(json.loads(out[out.index('{'):]))
    assert len(fused_models) == 1 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused_models[0].modules())
    assert [n['fused'] for n in numbers] == [True, False]
    assert numbers[0]['top1'] == numbers[1]['top1'] and numbers[0]['top5'] == numbers[1]['top5']
    assert numbers[0]['loss'] == pytest.approx(numbers[1]['loss'], rel=1e-5)
    assert numbers[0]['params'] == numbers[1]['params']  # the model as trained, not what fusing leaves


def test_n_processes_give_exactly_the_numbers_of_one(trained_run, tmp_path):
    data, run = trained_run
    numbers = []
    for num_proc in (1, 2):
        results_file = tmp_path / f'results-{num_proc}.csv'
        # 15 images in batches of 4: uneven shards, where padding would count images twice.
        eval_sh(data, run / 'last.pth.tar', '--no-ema', '-b', '4', '--results-file', str(results_file),
                num_proc=num_proc)
        with open(results_file, newline='') as f:
            numbers.append(next(csv.DictReader(f)))
    one, two = numbers
    assert two['processes'] == '2' and one['images'] == two['images'] == '15'
    assert (one['top1'], one['top5'], one['weights']) == (two['top1'], two['top5'], 'state_dict')
    assert float(one['loss']) == pytest.approx(float(two['loss']), rel=1e-6)


def test_authors_checkpoint_evaluates_with_its_ema_weights(tmp_path, capsys):
    checkpoint = reference_path('gqpe_tiny_original_checkpoint.pth.tar')
    data = make_image_folder(tmp_path / 'data', classes=tuple('abcdefghij'), per_class=1, splits=('val',))
    assert validate.main([str(data), '--checkpoint', str(checkpoint), '-j', '0']) == 0
    out = capsys.readouterr().out
    assert 'EMA weights (state_dict_ema)' in out
    results = json.loads(out[out.index('{'):])
    assert results['weights'] == 'state_dict_ema' and results['input_size'] == [3, 224, 224]

    # The same numbers by hand: the model the checkpoint describes, the model's eval transform.
    model = models.create_model_from_checkpoint(str(checkpoint)).eval()
    transform = create_eval_transform(resolve_input_config({'img_size': 224}, model))
    images = sorted((data / 'val').glob('*/*.png'))
    batch = torch.stack([transform(Image.open(p).convert('RGB')) for p in images])
    targets = torch.tensor([ord(p.parent.name) - ord('a') for p in images])
    with torch.no_grad():
        logits = model(batch)
    assert results['loss'] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
    assert results['top1'] == pytest.approx(100. * (logits.argmax(1) == targets).float().mean().item())


def test_live_weights_on_request(tmp_path, capsys):
    checkpoint = reference_path('gqpe_tiny_original_checkpoint.pth.tar')
    data = make_image_folder(tmp_path / 'data', classes=tuple('abcdefghij'), per_class=1, splits=('val',))
    assert validate.main([str(data / 'val'), '--checkpoint', str(checkpoint), '--no-ema', '-j', '0']) == 0
    assert 'live weights (state_dict)' in capsys.readouterr().out


def printed_results(out: str) -> dict:
    return json.loads(out[out.index('{'):])


def save_tiny_checkpoint(path, model_name='posmlp_t', args=None, **model_kwargs):
    """A project checkpoint of a 3-class TINY_KWARGS model whose training run recorded `args`."""
    kwargs = dict(TINY_KWARGS, num_classes=3, **model_kwargs)
    model = timm.create_model(model_name, **kwargs)
    models.save_checkpoint_file({'state_dict': model.state_dict(), 'model_name': model_name, 'model_kwargs': kwargs,
                                 'args': dict(args or {})}, str(path))
    return path


@pytest.mark.parametrize('source', ['authors', 'model_option'])
def test_results_name_the_model_that_was_built(tmp_path, capsys, source):
    if source == 'authors':  # architecture read off the weights: an LRPE gate
        data = make_image_folder(tmp_path / 'data', classes=tuple('abcdefghij'), per_class=1, splits=('val',))
        argv = ['--checkpoint', str(reference_path('lrpe_tiny_original_checkpoint.pth.tar'))]
    else:  # the checkpoint names posmlp_t (with an LRPE gate); --model names the variant
        data = make_image_folder(tmp_path / 'data', per_class=1, splits=('val',))
        checkpoint = save_tiny_checkpoint(tmp_path / 'tiny.pth.tar', gate='lrpe')
        argv = ['--checkpoint', str(checkpoint), '--model', 'posmlp_t_lrpe', *TINY_MODEL_ARGS, 'num_classes=3']
    assert validate.main([str(data), *argv, '-j', '0']) == 0
    assert printed_results(capsys.readouterr().out)['model'] == 'posmlp_t_lrpe'


def test_img_size_option_overrides_the_trained_input_size(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', per_class=1, splits=('val',))
    checkpoint = save_tiny_checkpoint(tmp_path / 'tiny.pth.tar', args={'input_size': [3, 64, 64]})
    assert validate.main([str(data), '--checkpoint', str(checkpoint), '--img-size', '32', '-j', '0']) == 0
    assert printed_results(capsys.readouterr().out)['input_size'] == [3, 32, 32]


def test_max_bad_images_with_a_timm_dataset_is_an_error(tmp_path, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / 'tiny.pth.tar')
    argv = [str(tmp_path), '--dataset', 'torch/cifar10', '--checkpoint', str(checkpoint), '--max-bad-images', '5']
    assert validate.main([*argv, '-j', '0']) == 1
    out = capsys.readouterr().out
    assert '--max-bad-images applies to image folders only' in out and 'Traceback' not in out


def test_a_missing_torchvision_dataset_is_not_offered_a_download(tmp_path, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / 'tiny.pth.tar')
    argv = [str(tmp_path), '--dataset', 'torch/cifar10', '--checkpoint', str(checkpoint), '-j', '0']
    assert validate.main(argv) == 1
    out = capsys.readouterr().out
    assert 'never downloads data' in out and 'Traceback' not in out
    assert not any(tmp_path.glob('cifar*'))


@pytest.mark.parametrize('batch_size', [4, 1])  # a batch with the image left out; a batch with no image
def test_unreadable_image_is_left_out_of_the_results(tmp_path, capsys, batch_size):
    data = make_image_folder(tmp_path / 'data', per_class=2, splits=('val',))
    checkpoint = save_tiny_checkpoint(tmp_path / 'tiny.pth.tar')
    argv = [str(data), '--checkpoint', str(checkpoint), '--max-bad-images', '1', '-j', '0', '-b', str(batch_size)]
    bad = data / 'val' / 'b' / 'b_0.png'
    bad.rename(tmp_path / 'b_0.png')
    assert validate.main(argv) == 0
    without = printed_results(capsys.readouterr().out)
    bad.write_bytes(b'not a png')
    assert validate.main(argv) == 0
    out = capsys.readouterr().out
    assert 'Skipped unreadable image' in out and 'b_0.png' in out
    results = printed_results(out)
    assert results['images'] == without['images'] == 5 and results['unreadable_images'] == 1
    assert (results['top1'], results['top5']) == (without['top1'], without['top5'])
    assert results['loss'] == pytest.approx(without['loss'], rel=1e-6)  # other batches, other float rounding


def test_unreadable_images_are_counted_over_all_processes(tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=2, splits=('val',))
    checkpoint = save_tiny_checkpoint(tmp_path / 'tiny.pth.tar')
    # Images 0 and 3: one in each process's shard, so each process alone is within the allowance of 1.
    for path in (data / 'val' / 'a' / 'a_0.png', data / 'val' / 'b' / 'b_1.png'):
        path.write_bytes(b'')
    result = subprocess.run(
        ['bash', str(ROOT / 'eval.sh'), str(data), str(checkpoint), '-j', '0', '--threads', '1', '-b', '2',
         '--max-bad-images', '1'], env=script_env(NUM_PROC='2'), capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    # Both processes stop with the error (neither waits for the other).
    assert result.stdout.count('2 images could not be read, more than the 1 allowed') == 2, result.stdout[-3000:]


@pytest.mark.parametrize('case, message', [
    ('missing_data', 'does not exist'),
    ('train_only', 'is neither a validation split'),
    ('missing_checkpoint', 'does not exist (or is not a file)'),
    ('no_ema', 'EMA weights were asked for, but the checkpoint has none'),
])
def test_bad_input_is_named(tmp_path, capsys, case, message):
    data = make_image_folder(tmp_path / 'data', per_class=1)
    train_only = make_image_folder(tmp_path / 'train_only', per_class=1, splits=('train',))
    checkpoint = tmp_path / 'plain.pth.tar'
    model = timm.create_model('posmlp_t', num_classes=3, **TINY_KWARGS)
    models.save_checkpoint_file({'state_dict': model.state_dict(), 'model_name': 'posmlp_t',
                                 'model_kwargs': dict(TINY_KWARGS, num_classes=3)}, str(checkpoint))
    argv = {
        'missing_data': [str(tmp_path / 'nowhere'), '--checkpoint', str(checkpoint)],
        'train_only': [str(train_only), '--checkpoint', str(checkpoint)],
        'missing_checkpoint': [str(data), '--checkpoint', str(tmp_path / 'nope.pth.tar')],
        'no_ema': [str(data), '--checkpoint', str(checkpoint), '--use-ema'],
    }[case]
    assert validate.main([*argv, '-j', '0']) == 1
    out = capsys.readouterr().out
    assert message in out and 'Traceback' not in out


@pytest.mark.parametrize('argv, message', [
    (['a', '--data-dir', 'b'], 'given twice, as a and as --data-dir b'),
    ([], 'give the data folder'),
    (['a', '-b', '0'], 'argument -b/--batch-size: must be 1 or more, not 0'),
    (['a', '-j', '-1'], 'argument -j/--workers: must be 0 or more, not -1; 0 loads the data in the main process'),
    (['a', '--log-interval', '0'], 'argument --log-interval: must be 1 or more, not 0'),
    (['a', '--max-bad-images', '-1'], 'argument --max-bad-images: must be 0 or more, not -1; 0 stops at the first'),
    (['a', '--threads', '-2'], "argument --threads: must be 0 or more, not -2; 0 uses torch's default"),
    (['a', '--interpolation', 'foo'], "--interpolation: invalid choice: 'foo'"),
    (['a', '--crop-mode', 'foo'], "--crop-mode: invalid choice: 'foo'"),
    (['a', '--img-size', '0'], 'argument --img-size: must be 1 or more, not 0'),
    (['a', '--input-size', '3', '0', '32'], 'argument --input-size: must be 1 or more, not 0'),
    (['a', '--model', 'posmlp_tt'], '--model posmlp_tt: no such model; did you mean posmlp_t'),
    (['a', '--device', 'foo'], '--device foo: not a device; give cpu, cuda or cuda:N.'),
    (['a', '--model-kwargs', 'gate'], "argument --model-kwargs: 'gate' is not KEY=VALUE (e.g. gate=lrpe)"),
])
def test_bad_options_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        validate.main([*argv, '--checkpoint', 'x'])
    assert message in capsys.readouterr().err


def test_results_file_needs_a_known_format(tmp_path, capsys):
    with pytest.raises(SystemExit):
        validate.main([str(tmp_path), '--checkpoint', 'x', '--results-file', str(tmp_path / 'r.txt')])
    assert 'name it .csv or .json' in capsys.readouterr().err


def test_eval_sh_usage():
    result = subprocess.run(['bash', str(ROOT / 'eval.sh'), 'only-one-arg'], capture_output=True, text=True,
                            env=script_env())
    assert result.returncode == 2 and 'usage:' in result.stderr


def save_checkpoint_predicting(path, label, class_to_idx=None):
    """A 3-class checkpoint whose head always predicts `label`; `class_to_idx` stored when given."""
    model = timm.create_model('posmlp_t', num_classes=3, **TINY_KWARGS)
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(F.one_hot(torch.tensor(label), 3) * 10.)
    checkpoint = {'state_dict': model.state_dict(), 'model_name': 'posmlp_t',
                  'model_kwargs': dict(TINY_KWARGS, num_classes=3)}
    if class_to_idx is not None:
        checkpoint['class_to_idx'] = class_to_idx
    models.save_checkpoint_file(checkpoint, str(path))
    return path


@pytest.mark.parametrize('map_source', ['checkpoint', 'class_map_file'])
def test_a_folder_with_fewer_classes_is_labelled_as_in_training(tmp_path, capsys, map_source):
    data = make_image_folder(tmp_path / 'data', classes=('b',), per_class=2, splits=('val',))
    argv = [str(data), '-j', '0']
    if map_source == 'checkpoint':
        argv += ['--checkpoint', str(save_checkpoint_predicting(tmp_path / 'c.pth.tar', 1, {'a': 0, 'b': 1, 'c': 2}))]
    else:
        (tmp_path / 'classes.txt').write_text('a\nb\nc\n')
        argv += ['--checkpoint', str(save_checkpoint_predicting(tmp_path / 'c.pth.tar', 1)),
                 '--class-map', str(tmp_path / 'classes.txt')]
    assert validate.main(argv) == 0
    assert printed_results(capsys.readouterr().out)['top1'] == 100.


def test_a_folder_with_fewer_classes_and_no_class_map_is_an_error(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', classes=('b',), per_class=1, splits=('val',))
    checkpoint = save_checkpoint_predicting(tmp_path / 'c.pth.tar', 1)
    assert validate.main([str(data), '--checkpoint', str(checkpoint), '-j', '0']) == 1
    out = capsys.readouterr().out
    assert 'has 1 class folders but the model predicts 3 classes' in out and '--class-map' in out
    assert 'Traceback' not in out


def test_a_class_folder_missing_from_the_class_map_is_named(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', classes=('b', 'zebra'), per_class=1, splits=('val',))
    checkpoint = save_checkpoint_predicting(tmp_path / 'c.pth.tar', 1, {'a': 0, 'b': 1, 'c': 2})
    assert validate.main([str(data), '--checkpoint', str(checkpoint), '-j', '0']) == 1
    out = capsys.readouterr().out
    assert 'has class folders that the class_to_idx of' in out and 'lacks: zebra' in out


def test_validate_split_option_picks_the_image_folder_split(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', per_class=1, splits=('train', 'val'))
    make_image_folder(tmp_path / 'data', per_class=2, splits=('test',))
    checkpoint = save_tiny_checkpoint(tmp_path / 'tiny.pth.tar')
    for split, images in (('validation', 3), ('test', 6)):
        assert validate.main([str(data), '--split', split, '--checkpoint', str(checkpoint), '-j', '0']) == 0
        assert printed_results(capsys.readouterr().out)['images'] == images
    assert validate.main([str(data), '--split', 'holdout', '--checkpoint', str(checkpoint), '-j', '0']) == 1
    assert 'has no holdout/ (the split asked for)' in capsys.readouterr().out


@pytest.mark.parametrize('present', [('train', 'test'), ('train', 'val', 'test')])
def test_training_val_split_picks_the_image_folder_split(tmp_path, present):
    root = make_image_folder(tmp_path / 'data', per_class=1, splits=present)
    _, val_set = create_training_datasets('', str(root), 'train', 'test', None)
    assert val_set.reader.root == str(root / 'test')


def test_images_without_class_folders_are_named(tmp_path, capsys):
    root = make_image_folder(tmp_path / 'data', per_class=1, splits=('train', 'val'))
    for image in (root / 'val').glob('*/*.png'):
        image.rename(root / 'val' / image.name)
    for folder in (root / 'val').iterdir():
        if folder.is_dir():
            folder.rmdir()
    with pytest.raises(DataError, match=r'holds images directly; they need one subfolder per class'):
        create_training_datasets('', str(root), 'train', 'validation', None)
    checkpoint = save_tiny_checkpoint(tmp_path / 'tiny.pth.tar')
    make_image_folder(tmp_path / 'data', per_class=1, splits=('val',))  # class folders beside the loose images
    assert validate.main([str(root), '--checkpoint', str(checkpoint), '-j', '0']) == 1
    assert f'{root / "val"}/<class>/<image>' in capsys.readouterr().out


def test_float16_autocasts_on_the_cpu():
    _, _, precision = resolve_precision(torch.device('cpu'), amp=True, amp_dtype='float16')
    with precision.autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float16
    assert precision.description == 'native AMP (float16)' and precision.loss_scaler is not None


@pytest.mark.parametrize('extra, description', [
    (['--amp'], 'native AMP (bfloat16)'),  # the CPU's default type, as in benchmark.py
    (['--amp-dtype', 'float16'], 'native AMP (float16)'),  # the type alone asks for AMP
    ([], 'float32'),
])
def test_amp_options_on_the_cpu(tmp_path, capsys, extra, description):
    data = make_image_folder(tmp_path / 'data', per_class=1, splits=('val',))
    checkpoint = save_tiny_checkpoint(tmp_path / 'tiny.pth.tar')
    assert validate.main([str(data), '--checkpoint', str(checkpoint), '--device', 'cpu', '-j', '0', *extra]) == 0
    assert f'img/s, {description}, 1 process(es)' in capsys.readouterr().out


def test_folders_lacking_classes_are_labelled_as_in_training(trained_run, tmp_path, capsys):
    """train.py stores its class_to_idx: the correct images of two parts of val/ add up to those of the whole."""
    data, run = trained_run
    correct = {}
    for part, kept in (('whole', 'abc'), ('a', 'a'), ('bc', 'bc')):
        folder = tmp_path / part
        for name in kept:
            shutil.copytree(data / 'val' / name, folder / name)
        assert validate.main([str(folder), '--checkpoint', str(run / 'last.pth.tar'), '-j', '0']) == 0
        results = printed_results(capsys.readouterr().out)
        correct[part] = round(results['top1'] * results['images'] / 100)
    assert correct['whole'] == correct['a'] + correct['bc']


@pytest.mark.parametrize('name, kwargs, size, problem', [
    ('vip_s7', dict(img_size=56, layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), segment_dim=(8, 4, 4, 4)), 64,
     'ViP takes only 56x56 input'),
    ('posmlp_t', dict(TINY_KWARGS, dynamic_img_pad=False), 48, 'which does not divide into 2x2 windows'),
])
def test_a_size_a_fixed_size_model_refuses_is_one_line(tmp_path, capsys, name, kwargs, size, problem):
    checkpoint = tmp_path / 'fixed.pth.tar'
    write_checkpoint(checkpoint, model_name=name, model_kwargs=kwargs)
    data = make_image_folder(tmp_path / 'data', classes=tuple(CLASS_TO_IDX), per_class=1, splits=('val',))
    assert validate.main([str(data), '--checkpoint', str(checkpoint), '-j', '0', '--img-size', str(size)]) == 1
    out = capsys.readouterr().out
    assert f'Stopped: {name} cannot take input (3, {size}, {size}): ' in out and problem in out
    assert 'Give --img-size (or --input-size) a size it takes' in out and 'Traceback' not in out


@pytest.mark.parametrize('labels', [{'cat': 'zero', 'dog': 1, 'fox': 2}, {'cat': True, 'dog': 1, 'fox': 2},
                                    {'cat': -1, 'dog': 1, 'fox': 2}, {'cat': 0.0, 'dog': 1, 'fox': 2}])
def test_a_class_map_whose_labels_are_not_labels_is_refused(tmp_path, capsys, labels):
    checkpoint = tmp_path / 'tampered.pth.tar'
    write_checkpoint(checkpoint, class_to_idx=labels)
    data = make_image_folder(tmp_path / 'data', classes=tuple(labels), per_class=1, splits=('val',))
    assert validate.main([str(data), '--checkpoint', str(checkpoint), '-j', '0']) == 1
    out = capsys.readouterr().out
    assert (f'Stopped: the class_to_idx of {checkpoint} is not a class map: its labels must be whole numbers '
            f'from 0, not {next(iter(labels.values()))!r}.') in out and 'Traceback' not in out


def test_a_class_map_that_gives_two_classes_one_label_is_refused(tmp_path, capsys):
    # Both classes' images would count as the one class, and half of the wrong answers as right.
    checkpoint = tmp_path / 'tampered.pth.tar'
    write_checkpoint(checkpoint, class_to_idx={'cat': 1, 'dog': 1, 'fox': 2})
    data = make_image_folder(tmp_path / 'data', classes=('cat', 'dog', 'fox'), per_class=1, splits=('val',))
    assert validate.main([str(data), '--checkpoint', str(checkpoint), '-j', '0']) == 1
    out = capsys.readouterr().out
    assert f"Stopped: the class_to_idx of {checkpoint} is not a class map: classes 'cat', 'dog' share label 1" in out
    assert 'Traceback' not in out


def test_an_input_size_with_other_channels_than_the_model_takes_is_one_line(tmp_path, capsys):
    checkpoint = tmp_path / 'rgb.pth.tar'
    write_checkpoint(checkpoint)
    data = make_image_folder(tmp_path / 'data', classes=tuple(CLASS_TO_IDX), per_class=1, splits=('val',))
    assert validate.main([str(data), '--checkpoint', str(checkpoint), '-j', '0', '--input-size', '1', '32', '32']) == 1
    out = capsys.readouterr().out
    assert ('Stopped: the input has 1 channels (--input-size), but the model takes 3; give --input-size 3 H W, or '
            'leave it out.') in out and 'Traceback' not in out
