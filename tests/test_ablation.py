"""The gate ablation: the reduced training set, and a smoke run of the whole pipeline on a tiny folder."""
import csv

import pytest

from conftest import make_image_folder
from utils import ablation


def test_stratified_subset_is_seeded_and_per_class(tmp_path):
    root = make_image_folder(tmp_path / 'data', per_class=10, splits=('train',))
    subset = ablation.stratified_subset(root / 'train', 0.3, seed=0)
    assert sorted({p.split('/')[0] for p in subset}) == ['a', 'b', 'c']
    assert all(sum(p.startswith(f'{c}/') for p in subset) == 3 for c in 'abc')
    assert subset == ablation.stratified_subset(root / 'train', 0.3, seed=0)
    assert subset != ablation.stratified_subset(root / 'train', 0.3, seed=1)


def test_reduced_folder_keeps_val_and_is_reused(tmp_path, image_folder):
    dest = ablation.build_reduced_folder(image_folder, 0.5, 0, tmp_path / 'reduced')
    assert ablation.count_images(dest / 'train') == 9
    assert ablation.count_images(dest / 'val') == ablation.count_images(image_folder / 'val')
    stamp = (dest / ablation.SUBSET_LIST).stat().st_mtime_ns
    ablation.build_reduced_folder(image_folder, 0.5, 0, tmp_path / 'reduced')
    assert (dest / ablation.SUBSET_LIST).stat().st_mtime_ns == stamp
    ablation.build_reduced_folder(image_folder, 0.5, 1, tmp_path / 'reduced')  # another subset replaces it
    assert (dest / ablation.SUBSET_LIST).read_text().split() == ablation.stratified_subset(
        image_folder / 'train', 0.5, 1)


def test_bad_options_name_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ablation.main(['--out', str(tmp_path), '--reduced-fraction', '1.5'])
    error = capsys.readouterr().err
    assert 'argument --reduced-fraction: must be between 0 and 1 (a share, e.g. 0.1), not 1.5' in error
    assert ablation.main(['--out', str(tmp_path), '--model-kwargs', 'win_size']) == 1
    assert '--model-kwargs' in capsys.readouterr().err


def test_model_kwargs_spelled_as_in_train_py():
    parser = ablation.build_parser()
    # --model-kwarg, the old name, still reads: the commands recorded in logs/ use it. As a name of its own,
    # not by argparse's prefix matching, which another --model-kwarg* option would make ambiguous.
    parser.allow_abbrev = False
    args = parser.parse_args(['--model-kwargs', 'win_size=[8,4,2,1]', 'gamma=2', '--model-kwarg', 'depths=[1,1,1,1]'])
    assert ablation.parse_model_kwargs(args.model_kwargs) == dict(win_size=[8, 4, 2, 1], gamma=2, depths=[1, 1, 1, 1])
    shown = ablation.argv_for_table(args)
    assert shown == ['--model-kwargs', 'win_size=[8,4,2,1]', 'gamma=2', 'depths=[1,1,1,1]']
    assert parser.parse_args(shown) == args  # the table's reproduce command means the same run


def test_smoke_two_gates_table_and_logs(tmp_path, image_folder, capsys):
    out, runs = tmp_path / 'logs', tmp_path / 'runs'
    argv = ['--out', str(out), '--runs-dir', str(runs), '--data-dir', str(image_folder),
            '--gates', 'gqpe', 'sgu', '--seeds', '0', '--regimes', 'reduced', '--reduced-fraction', '0.5',
            '--epochs', '1', '--model-kwargs', 'embed_dims=[8,16,16,32]',
            '--', '-b', '4', '--workers', '0', '--warmup-epochs', '0']
    assert ablation.main(argv) == 0
    with open(out / 'results.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [(r['gate'], r['regime'], r['epochs'], r['train_images']) for r in rows] == [
        ('gqpe', 'reduced', '2', '9'), ('sgu', 'reduced', '2', '9')]
    assert int(rows[0]['params']) < int(rows[1]['params'])  # SGU's N x N matrices outweigh GQPE's Gaussians
    table = (out / 'table.md').read_text()
    assert '| gqpe | reduced | 9 | 2 |' in table and '| sgu | reduced | 9 | 2 |' in table
    assert '--epochs 1' in table and "--model-kwargs 'embed_dims=[8,16,16,32]'" in table and '-- -b 4' in table
    for run in ('reduced-gqpe-seed0', 'reduced-sgu-seed0'):
        assert (out / run / 'summary.csv').is_file() and (out / run / 'args.yaml').is_file()
    assert (out / 'reduced_train_images.txt').read_text().count('\n') == 9

    capsys.readouterr()
    assert ablation.main(argv) == 0  # finished runs are reused, not trained again
    assert capsys.readouterr().out.count('reusing') == 2
