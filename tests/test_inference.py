"""inference.py: folders, file lists and single images to top-k predictions, names, formats and bad input."""
import csv
import errno
import json
import os

import pyarrow.parquet
import pytest
import torch
from PIL import Image
from timm.data import ImageNetInfo

from conftest import TINY_KWARGS, make_image_folder, refuse_under
from tool_helpers import CLASS_TO_IDX, write_checkpoint

import inference
import models
from utils.data import create_eval_transform, resolve_input_config

pytestmark = pytest.mark.usefixtures('in_process_run')
FAST = ['-j', '0', '-b', '4', '--no-console-results']


@pytest.fixture
def images(tmp_path):
    """val/<class>/<image>: 3 classes of 2 images, a damaged image and a file that is no image."""
    folder = make_image_folder(tmp_path / 'images', classes=('cat', 'dog', 'fox'), per_class=2, splits=('val',))
    (folder / 'val' / 'dog' / 'broken.png').write_bytes(b'\x89PNG not really')
    (folder / 'val' / 'notes.txt').write_text('not an image')
    return folder / 'val'


def expected_outputs(checkpoint, paths, output_type='prob'):
    """What the model gives each image through the checkpoint's evaluation transform."""
    model = models.create_model_from_checkpoint(str(checkpoint)).eval()
    transform = create_eval_transform(resolve_input_config({}, model))
    batch = torch.stack([transform(Image.open(p).convert('RGB')) for p in paths])
    with torch.no_grad():
        out = model(batch)
    return out.softmax(-1) if output_type == 'prob' else out


def test_a_folder_gives_top_k_names_and_probabilities_in_every_format(tmp_path, images, capsys):
    write_checkpoint(tmp_path / 'best.pth.tar')
    out = tmp_path / 'results'
    assert inference.main([str(images), '--checkpoint', str(tmp_path / 'best.pth.tar'), '--topk', '2',
                           '--include-index', '--results-dir', str(out), '--results-format', 'csv', 'json',
                           'parquet', *FAST]) == 0
    log = capsys.readouterr().out
    assert 'Skipped unreadable image' in log and 'broken.png' in log
    assert '1 of 7 images could not be read' in log and 'notes.txt' in log

    results = json.loads((out / 'posmlp_t-32.json').read_text())
    names = sorted(p.relative_to(images).as_posix() for p in images.rglob('*_*.png'))
    assert sorted(results) == names
    expected = expected_outputs(tmp_path / 'best.pth.tar', [images / n for n in names]).topk(2)
    idx_to_class = {v: k for k, v in CLASS_TO_IDX.items()}
    for name, probs, indices in zip(names, expected.values.tolist(), expected.indices.tolist()):
        assert results[name]['index'] == indices
        assert results[name]['label'] == [idx_to_class[i] for i in indices]
        assert results[name]['prob'] == pytest.approx(probs, abs=1e-6)
    with open(out / 'posmlp_t-32.csv', newline='') as f:
        rows = {row['filename']: row for row in csv.DictReader(f)}
    assert list(rows[names[0]]) == ['filename', 'index_0', 'index_1', 'label_0', 'label_1', 'prob_0', 'prob_1']
    assert [rows[n]['label_0'] for n in names] == [results[n]['label'][0] for n in names]
    table = pyarrow.parquet.read_table(out / 'posmlp_t-32.parquet').to_pylist()
    assert {row['filename']: row['label'] for row in table} == {n: results[n]['label'] for n in names}


def test_a_file_list_and_a_single_image_name_their_images_as_given(tmp_path, images, capsys):
    write_checkpoint(tmp_path / 'best.pth.tar', ema=False)
    listing = tmp_path / 'list.txt'
    listing.write_text('# my images\nimages/val/cat/cat_0.png\n\nimages/val/missing.png\n')
    base = ['--checkpoint', str(tmp_path / 'best.pth.tar'), '--results-dir', str(tmp_path), '--label-type', 'none',
            '--output-type', 'logit', '-j', '0']
    assert inference.main([str(listing), *base, '--results-file', 'listed.json']) == 0
    out = capsys.readouterr().out
    assert 'Skipped unreadable image' in out and 'missing.png' in out
    printed = json.loads(out[out.index('\n{') + 1:])
    assert printed == json.loads((tmp_path / 'listed.json').read_text())
    logits = expected_outputs(tmp_path / 'best.pth.tar', [images / 'cat' / 'cat_0.png'], 'logit')[0]
    assert list(printed) == ['images/val/cat/cat_0.png']
    assert printed['images/val/cat/cat_0.png'] == {'index': int(logits.argmax()),
                                                    'logit': pytest.approx(float(logits.max()), abs=1e-5)}

    single = images / 'fox' / 'fox_1.png'
    assert inference.main([str(single), *base, '--results-file', 'one.csv', '--fullname', '--no-console-results']) == 0
    with open(tmp_path / 'one.csv', newline='') as f:
        assert [row['filename'] for row in csv.DictReader(f)] == [str(single.resolve())]


def test_a_1000_class_model_without_a_class_map_gets_imagenet_names(tmp_path, images):
    write_checkpoint(tmp_path / 'in1k.pth.tar', class_to_idx=None, num_classes=1000)
    assert inference.main([str(images / 'cat'), '--checkpoint', str(tmp_path / 'in1k.pth.tar'), '--topk', '3',
                           '--results-file', str(tmp_path / 'r.json'), '--include-index', *FAST]) == 0
    info = ImageNetInfo()
    for result in json.loads((tmp_path / 'r.json').read_text()).values():
        assert result['label'] == [info.index_to_description(i) for i in result['index']]


def test_a_model_without_class_names_says_so_and_gives_indices(tmp_path, images, capsys):
    write_checkpoint(tmp_path / 'plain.pth.tar', class_to_idx=None, num_classes=5)
    assert inference.main([str(images), '--checkpoint', str(tmp_path / 'plain.pth.tar'), '--topk', '9',
                           '--results-file', str(tmp_path / 'r.json'), *FAST]) == 0
    log = capsys.readouterr().out
    assert 'No class names' in log and '--class-map FILE names them' in log
    assert '--topk 9: the model has only 5 classes; giving 5' in log
    result = next(iter(json.loads((tmp_path / 'r.json').read_text()).values()))
    assert sorted(result['index']) == [0, 1, 2, 3, 4] and 'label' not in result


@pytest.mark.parametrize('make, message', [
    (lambda tmp: tmp / 'nowhere', 'does not exist; give an image, a folder of images or a file list'),
    (lambda tmp: (tmp / 'a.pdf').write_bytes(b'%PDF') and tmp / 'a.pdf', 'is neither an image'),
    (lambda tmp: (tmp / 'b.png').write_bytes(b'nope') and tmp / 'b.png', 'none of the 1 images could be read'),
])
def test_bad_input_is_one_line(tmp_path, capsys, make, message):
    write_checkpoint(tmp_path / 'best.pth.tar')
    assert inference.main([str(make(tmp_path)), '--checkpoint', str(tmp_path / 'best.pth.tar'), *FAST]) == 1
    assert message in capsys.readouterr().out


def test_a_size_a_fixed_size_model_refuses_is_one_line(tmp_path, capsys):
    write_checkpoint(tmp_path / 'fixed.pth.tar', model_kwargs=dict(TINY_KWARGS, dynamic_img_pad=False))
    folder = make_image_folder(tmp_path / 'images', per_class=1, splits=('val',)) / 'val'
    checkpoint = str(tmp_path / 'fixed.pth.tar')
    assert inference.main([str(folder), '--checkpoint', checkpoint, *FAST, '--img-size', '48']) == 1
    out = capsys.readouterr().out
    assert 'Stopped: posmlp_t cannot take input (3, 48, 48): ' in out and 'Traceback' not in out


def test_bad_options_are_named(tmp_path, capsys, monkeypatch):
    base = [str(tmp_path), '--checkpoint', 'x.pth.tar']
    with pytest.raises(SystemExit):
        inference.main([*base, '--topk', '0'])
    assert 'argument --topk: must be 1 or more, not 0' in capsys.readouterr().err
    monkeypatch.setitem(__import__('sys').modules, 'pyarrow', None)  # as if pyarrow were not installed
    with pytest.raises(SystemExit):
        inference.main([*base, '--results-format', 'parquet'])
    assert 'parquet results need pyarrow: pip install pyarrow' in capsys.readouterr().err


def test_results_that_cannot_be_written_are_one_line_naming_the_file(tmp_path, images, capsys, monkeypatch):
    write_checkpoint(tmp_path / 'best.pth.tar')
    base = [str(images), '--checkpoint', str(tmp_path / 'best.pth.tar'), '--results-file', 'r.csv', *FAST]
    in_the_way = tmp_path / 'file'
    in_the_way.write_text('')
    assert inference.main([*base, '--results-dir', str(in_the_way)]) == 1
    out = capsys.readouterr().out
    assert f'Stopped: cannot write {in_the_way}: ' in out and 'a file is in the way of a folder: point --results-dir' \
        in out and 'Traceback' not in out
    locked = tmp_path / 'locked'
    locked.mkdir()
    refuse_under(monkeypatch, locked)
    assert inference.main([*base, '--results-dir', str(locked)]) == 1
    out = capsys.readouterr().out
    assert f'Stopped: cannot write {locked / "r.csv"}: {os.strerror(errno.EROFS)}; that file system is read-only: ' \
           f'point --results-dir at a writable disk.' in out and 'Traceback' not in out
    assert list(locked.iterdir()) == []
