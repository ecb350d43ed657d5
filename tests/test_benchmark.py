"""benchmark.py end to end on a tiny PosMLP (32 px, one block per stage), its entries, suites and --bench data."""
import csv
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import timm
import torch

from conftest import ROOT, TINY_KWARGS, make_image_folder, restored_process_state

import benchmark
from utils import benchmarking, loader_benchmark, suites

TINY_ARGS = ['--img-size', str(TINY_KWARGS['img_size']), '--model-kwargs'] + [
    f'{key}={"(" + ",".join(map(str, value)) + ")"}' for key, value in TINY_KWARGS.items() if key != 'img_size'
]
QUICK_ARGS = ['--batch-size', '2', '--warmup', '1', '--repeats', '2', '--steps', '1', '--threads', '1']
NUMBER_COLUMNS = ('img_per_sec', 'img_per_sec_min', 'img_per_sec_max', 'ms_per_step', 'cpu_ms_per_step', 'params_m',
                  'gmacs', 'peak_mem_mb')
COLUMNS = ('model', 'setting', 'mode', 'batch_size', 'img_size', 'dtype') + NUMBER_COLUMNS
# A model whose inference form fuses two linear layers into one, as a reparameterizable model does.
FUSABLE_MODULE = '''
import torch
from timm.models import register_model


class TwoLinear(torch.nn.Sequential):
    def fuse(self):
        first, second = self
        fused = torch.nn.Linear(first.in_features, second.out_features)
        fused.weight.data = second.weight @ first.weight
        fused.bias.data = second.weight @ first.bias + second.bias
        return fused


class FusableNet(torch.nn.Module):
    num_classes = 10

    def __init__(self):
        super().__init__()
        self.flatten = torch.nn.Flatten()
        self.head = TwoLinear(torch.nn.Linear(3 * 32 * 32, 64), torch.nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.flatten(x))


@register_model
def fusable_net(pretrained=False, **kwargs):
    return FusableNet()
'''


def check_row(row: dict, mode: str, setting: str, memory_reported: bool = True):
    assert (row['model'], row['setting'], row['mode']) == ('posmlp_t', setting, mode)
    assert int(row['batch_size']) == 2 and int(row['img_size']) == 32 and row['dtype'] == 'float32'
    for column in NUMBER_COLUMNS:
        if column == 'peak_mem_mb' and not memory_reported:
            assert row[column] is None  # tasks sharing a process: their memory is not attributable
        else:
            assert float(row[column]) > 0, (column, row)
    assert float(row['img_per_sec_min']) <= float(row['img_per_sec']) <= float(row['img_per_sec_max'])


def test_infer_and_train_in_workers_write_csv(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('MALLOC_ARENA_MAX', '2')
    results = tmp_path / 'results.csv'
    argv = ['--model', 'posmlp_t', '--bench', 'both', *QUICK_ARGS, *TINY_ARGS, '--results-file', str(results)]
    assert benchmark.main(argv) == 0, capsys.readouterr().err
    header, *lines = capsys.readouterr().out.strip().splitlines()[2:]
    assert header.split()[:3] == ['model', 'setting', 'mode'] and 'peak' in header
    assert [line.split()[2] for line in lines] == ['infer', 'train']
    with results.open() as file:
        rows = list(csv.DictReader(file))
    assert set(COLUMNS) <= set(rows[0])
    for row, mode in zip(rows, ('infer', 'train')):
        check_row(row, mode, 'default')  # peak memory too: each task had a worker process of its own
    assert rows[1]['optimizer'] == 'momentum'
    assert len(rows[0]['round_img_per_sec'].split()) == 2
    # Each line says how and where it was measured, allocator settings included.
    assert shlex.split(rows[0]['command']) == ['python3', 'benchmark.py', *argv]
    assert rows[0]['warmup'] == '1' and rows[0]['torch_threads'] == '1' and rows[0]['date'] and rows[0]['torch']
    assert json.loads(rows[0]['env_vars'])['MALLOC_ARENA_MAX'] == '2'


def test_entry_settings_in_one_process_write_json(tmp_path, capsys, in_process_run):
    results = tmp_path / 'results.json'
    code = benchmark.main(['--model', 'posmlp_t', 'posmlp_t gate_impl=reference', '--bench', 'inference',
                           '--no-isolate', '--baseline', 'posmlp_t gate_impl=reference', *QUICK_ARGS, *TINY_ARGS,
                           '--results-file', str(results)])
    out = capsys.readouterr().out
    assert code == 0
    assert 'gate_impl=reference' in out and 'vs base' in out and 'not reported' in out
    report = json.loads(results.read_text())
    assert report['environment']['torch'] and report['environment']['command'].startswith('python3 benchmark.py')
    assert report['environment']['baseline'] == 'posmlp_t gate_impl=reference'
    rows = report['results']
    assert [(r['setting'], r['mode']) for r in rows] == [('default', 'infer'), ('gate_impl=reference', 'infer')]
    assert rows[1]['speed_vs_baseline'] == 1 and rows[0]['speed_vs_baseline'] > 0
    assert rows[1]['model_kwargs']['gate_impl'] == 'reference'
    assert rows[1]['model_kwargs']['embed_dims'] == [8, 16, 16, 32]
    check_row(rows[1], 'infer', 'gate_impl=reference', memory_reported=False)


def test_reparam_times_the_fused_model_for_inference(tmp_path, monkeypatch, capsys, in_process_run):
    # --import brings in a model registered elsewhere; --reparam fuses it for inference, not for training.
    (tmp_path / 'fusable_models.py').write_text(FUSABLE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    results = tmp_path / 'results.json'
    code = benchmark.main(['--import', 'fusable_models', '--model', 'fusable_net', '--img-size', '32', '--reparam',
                           '--no-isolate', *QUICK_ARGS, '--results-file', str(results)])
    assert code == 0, capsys.readouterr().err
    infer, train = json.loads(results.read_text())['results']
    assert (infer['reparam'], train['reparam']) == (True, False)
    assert infer['gmacs'] == pytest.approx(3 * 32 * 32 * 10 / 1e9, rel=1e-3)  # one fused layer
    assert train['gmacs'] == pytest.approx((3 * 32 * 32 * 64 + 64 * 10) / 1e9, rel=1e-3)


def analytic_macs(kwargs: dict, num_classes: int = 1000, in_chans: int = 3) -> int:
    """Multiply-accumulates of one GQPE PosMLP forward on one image, counted by hand (windows of 2 or more)."""
    side = (kwargs['img_size'] + 1) // 2
    dims = kwargs['embed_dims']
    macs = side * side * (dims[0] // 2) * in_chans * 9          # stem conv1, 3x3 stride 2
    side = (side + 1) // 2
    macs += side * side * dims[0] * (dims[0] // 2) * 9          # stem conv2, 3x3 stride 2
    macs += side * side * dims[0] * dims[0]                     # stem conv3, 1x1
    stages = zip(dims, kwargs['depths'], kwargs['mlp_ratio'], kwargs['gamma'], kwargs['win_size'])
    for i, (dim, depth, ratio, gamma, win) in enumerate(stages):
        if i:
            side = (side + 1) // 2
            macs += side * side * dim * 9                       # downsample: 3x3 conv, one input channel each
        tokens, hidden, window = side * side, int(ratio * dim), win * win
        maps = gamma * 2 * 2 * 2 + gamma * 5 * window * window  # S S^T, then 5 feature weights per offset
        mlp = tokens * dim * hidden + tokens * (hidden // 2) * window + tokens * (hidden // 2) * dim
        macs += depth * (maps + mlp)                            # fc1, the mixing, fc2
    return macs + dims[-1] * num_classes


@pytest.mark.parametrize('gate_impl', ['fast', 'reference'])
def test_gmacs_match_a_count_by_hand(gate_impl):
    kwargs = dict(TINY_KWARGS, img_size=64, win_size=(4, 4, 2, 2))
    model = timm.create_model('posmlp_t', gate_impl=gate_impl, **kwargs)
    gmacs = benchmarking.count_gmacs(model, (3, 64, 64), torch.device('cpu'), torch.contiguous_format)
    assert round(gmacs * 1e9) == analytic_macs(kwargs)


def test_reparam_times_the_fused_posmlp_for_inference_only():
    _, tasks, _, config = benchmark.parse_args(['--model', 'posmlp_t', '--reparam', *QUICK_ARGS, *TINY_ARGS])
    with restored_process_state():
        infer, train = (benchmarking.ModelBench(task, config) for task in tasks)
    assert [task.mode for task in tasks] == ['infer', 'train']
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in infer.run_model.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in train.run_model.modules())
    assert infer.gmacs < train.gmacs  # the fused model's maps are stored, not made


def test_input_size_follows_the_entry_model_arguments():
    kwargs = dict(TINY_KWARGS, img_size=64, in_chans=1)
    model = timm.create_model('posmlp_t', **kwargs)
    assert benchmarking.benchmark_input_size(model, kwargs, None) == (1, 64, 64)
    assert benchmarking.benchmark_input_size(model, kwargs, 48) == (1, 48, 48)  # --img-size wins
    assert benchmarking.benchmark_input_size(model, dict(kwargs, img_size=(64, 96)), None) == (1, 64, 96)
    assert benchmarking.benchmark_input_size(model, {}, None) == (3, 224, 224)  # the model's data config


def test_rectangular_inputs_are_reported_as_such(in_process_run):
    model_kwargs = TINY_ARGS[TINY_ARGS.index('--model-kwargs'):]  # without --img-size
    _, tasks, _, config = benchmark.parse_args(['--model', 'posmlp_t img_size=(32,64)', '--bench', 'inference',
                                                *QUICK_ARGS, *model_kwargs])
    assert benchmarking.ModelBench(tasks[0], config).describe()['img_size'] == '32x64'


def rows_from_round_times(*seconds_per_entry):
    """Result rows of entries whose rounds took these wall times (batch 2, one step per round)."""
    _, tasks, _, config = benchmark.parse_args(['--model', 'posmlp_t', 'posmlp_t gate_impl=reference',
                                                '--bench', 'inference', *QUICK_ARGS])
    info = dict(img_size=32, dtype='float32', params_m=1., gmacs=1.)
    rows = [benchmarking.result_row(task, info, [(wall, wall) for wall in seconds], None, config)
            for task, seconds in zip(tasks, seconds_per_entry)]
    benchmarking.add_speed_vs_baseline(rows, tasks, tasks[0].entry)
    return rows


def test_speed_vs_baseline_is_the_median_of_per_round_ratios():
    base, other = rows_from_round_times([0.2, 0.1, 0.05], [2 / 15, 0.1, 0.02])  # 10, 20, 40 and 15, 20, 100 img/s
    # Per-round ratios 1.5, 1.0 and 2.5: their median, not the ratio of the medians (1.0).
    assert other['speed_vs_baseline'] == pytest.approx(1.5) and base['speed_vs_baseline'] == 1.0
    # From the rates as measured, not as rounded for the results file (0.0004 and 0.0006 img/s round to 0.0 and 0.001).
    _, slow = rows_from_round_times([5000., 5000.], [10000 / 3, 10000 / 3])
    assert slow['speed_vs_baseline'] == pytest.approx(1.5)
    # Rounded once, for the table: 1.1346 is 1.13x (rounding to 1.135 first would print 1.14x).
    _, near = rows_from_round_times([1.], [1 / 1.1346])
    assert benchmarking.format_cell('speed_vs_baseline', near) == '1.13x'
    assert benchmarking.file_rows([near])[0]['speed_vs_baseline'] == 1.135


def test_model_error_in_a_worker_is_one_line_naming_the_entry(capsys):
    code = benchmark.main(['--model', 'posmlp_t no_such_arg=1', '--bench', 'inference', *QUICK_ARGS, *TINY_ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith('benchmark.py: error: posmlp_t no_such_arg=1 (infer): TypeError')
    assert 'no_such_arg' in err[-1] and 'keyword names' in err[-1] and 'Traceback' not in '\n'.join(err)


def test_a_model_that_runs_out_of_memory_names_the_way_out(capsys, in_process_run, monkeypatch):
    def no_memory(*args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 12000000000000 bytes.\nmore detail")

    monkeypatch.setattr(benchmarking.ModelBench, '__init__', no_memory)
    code = benchmark.main(['--model', 'posmlp_t', '--bench', 'inference', '--no-isolate', *QUICK_ARGS, *TINY_ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith('benchmark.py: error: posmlp_t (infer): out of memory (')
    assert err[-1].endswith('try --no-interleave (one model at a time) or a smaller --batch-size')


def test_entry_syntax():
    entry = benchmarking.parse_entry('posmlp_t  gate_impl=reference embed_dims=(8,16) drop_rate=0.1')
    assert entry.model == 'posmlp_t' and entry.text == 'posmlp_t gate_impl=reference embed_dims=(8,16) drop_rate=0.1'
    assert entry.kwargs == dict(gate_impl='reference', embed_dims=(8, 16), drop_rate=0.1)
    assert entry.setting == 'gate_impl=reference embed_dims=(8,16) drop_rate=0.1'
    plain = benchmarking.parse_entry('gmlp_s16_224')
    assert (plain.kwargs, plain.setting) == ({}, 'default')


@pytest.mark.parametrize('text, problem', [
    ('posmlp_t gate_impl', "'gate_impl' is not KEY=VALUE"),
    ('posmlp_t 1x=2', "'1x=2' is not KEY=VALUE"),
    ('  ', 'empty entry'),
    ('posmlp_t a=1 a=2', 'a given twice'),
])
def test_bad_entries_name_the_problem(text, problem):
    with pytest.raises(ValueError, match=problem):
        benchmarking.parse_entry(text)


@pytest.mark.parametrize('args, problem', [
    (['--model', 'posmlp_tt'], '--model: posmlp_tt: no such model; did you mean posmlp_t'),
    (['--model-list', 'LIST'], "--model-list LIST: 'posmlp_t x=1' is listed twice"),
    (['--suite', 'comparison'], '--suite comparison: posmlp_tt: no such model'),
    (['--model', 'posmlp_t', '--results-file', 'out.txt'], 'name it .csv or .json, or give --results-format'),
    (['--model', 'posmlp_t', '--repeats', '0'], 'argument --repeats: must be 1 or more, not 0'),
    (['--model', 'posmlp_t', '--warmup', '-1'], 'argument --warmup: must be 0 or more, not -1'),
    (['--model', 'posmlp_t', 'posmlp_t'], 'listed twice'),
    (['--model', 'posmlp_t', '--baseline', 'gmlp_s16_224'], 'not one of the entries'),
    (['--model', 'posmlp_t', '--model-kwargs', 'pretrained=True'], 'never downloaded'),
    (['--model', 'posmlp_t pretrained=True'], 'never downloaded'),
    (['--model', 'posmlp_t gate_impl'], "'gate_impl' is not KEY=VALUE"),
    (['--import', 'no_such_module', '--model', 'posmlp_t'], 'put the folder that holds it on PYTHONPATH'),
    (['--model', 'posmlp_t', '--opt', 'nosuchopt'], '--opt nosuchopt: timm has no such optimizer'),
    (['--model', 'posmlp_t', '--device', 'foo'], '--device foo: not a device'),
    (['--model-list', 'no/such/list.txt'], '--model-list no/such/list.txt: No such file'),
    (['--suite', 'nosuch'], "--suite: invalid choice: 'nosuch'"),
    ([], 'name what to time'),
    (['--bench', 'data', '--data-dir', 'no/such/dir'], '--data-dir no/such/dir: no such folder'),
    (['--bench', 'data', '--recipe', 'no/such.yaml'], '--recipe no/such.yaml: no such file'),
])
def test_bad_arguments_are_one_line(args, problem, tmp_path, monkeypatch, capsys):
    (tmp_path / 'models.txt').write_text('posmlp_t x=1\nposmlp_t  x=1\n')
    monkeypatch.setitem(suites.SUITES, 'comparison', suites.Suite(('posmlp_t', 'posmlp_tt'), 'posmlp_t', {}, ''))
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args([str(tmp_path / 'models.txt') if arg == 'LIST' else arg for arg in args])
    problem = problem.replace('LIST', str(tmp_path / 'models.txt'))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and problem in err and 'Traceback' not in err


def test_flags_as_timm_names_them(tmp_path):
    (tmp_path / 'models.txt').write_text('# a comment\nposmlp_t\n\nposmlp_t gate_impl=reference\n')
    args, tasks, _, config = benchmark.parse_args(['-m', 'gmlp_s16_224', '--model-list', str(tmp_path / 'models.txt'),
                                                   '-b', '7', '--bench', 'train', '--results-file', 'out',
                                                   '--results-format', 'json', '--amp', '--device', 'cpu'])
    assert [task.label for task in tasks] == ['posmlp_t (train)', 'posmlp_t gate_impl=reference (train)',
                                              'gmlp_s16_224 (train)']
    assert (config.batch_size, config.amp_dtype, config.device) == (7, 'bfloat16', 'cpu')


def test_comparison_suite_is_the_papers_table():
    suite = suites.SUITES['comparison']
    assert suite.models == ('eamlp_14', 'gmlp_s16_224', 'resmlp_24_224', 'vip_s7', 'eamlp_19', 'mixer_b16_224',
                            'vip_m7', 'gmlp_b16_224', 'resmlp_b24_224', 'vip_l7', 'posmlp_t', 'posmlp_s', 'posmlp_b')
    assert suite.baseline == 'vip_s7' and suite.reference_img_per_sec['vip_s7'] == 719
    assert [name for name in suite.models if not timm.is_model(name)] == []
    rows = [dict(model=name, setting='default', mode=mode) for name in ('eamlp_14', 'gmlp_s16_224', 'vip_s7')
            for mode in benchmarking.MODES]
    suites.add_reference_columns(rows, suite)
    assert [(r['paper_img_per_sec'], r['paper_vs_baseline']) for r in rows] == [
        (711, round(711 / 719, 3)), (None, None), (None, None), (None, None), (719, 1.0), (None, None)]


def test_a_suite_runs_its_models_against_its_baseline(tmp_path, monkeypatch, capsys, in_process_run):
    # The same machinery as the comparison suite's, on tiny PosMLPs.
    tiny_suite = suites.Suite(models=('posmlp_t', 'posmlp_t_lrpe'), baseline='posmlp_t_lrpe',
                              reference_img_per_sec=dict(posmlp_t=360, posmlp_t_lrpe=720), reference='a test')
    monkeypatch.setitem(suites.SUITES, 'comparison', tiny_suite)
    results = tmp_path / 'results.json'
    code = benchmark.main(['--suite', 'comparison', '--bench', 'inference', '--no-isolate', *QUICK_ARGS,
                           *TINY_ARGS, '--results-file', str(results)])
    out = capsys.readouterr().out
    assert code == 0 and 'paper img/s' in out and 'paper vs posmlp_t_lrpe' in out and 'vs base' in out
    rows = json.loads(results.read_text())['results']
    assert [row['model'] for row in rows] == ['posmlp_t', 'posmlp_t_lrpe']
    assert [row['paper_vs_baseline'] for row in rows] == [0.5, 1.0] and rows[1]['speed_vs_baseline'] == 1


@pytest.mark.parametrize('argv, most_alive', [([], 2), (['--no-interleave'], 1), (['--suite', 'comparison'], 1),
                                               (['--suite', 'comparison', '--interleave'], 2)])
def test_one_at_a_time_holds_one_model(argv, most_alive, monkeypatch, capsys, in_process_run):
    # A suite's models together outgrow a 24 GB machine's memory in training: a suite times one at a time.
    tiny_suite = suites.Suite(models=('posmlp_t', 'posmlp_t_lrpe'), baseline='posmlp_t',
                              reference_img_per_sec=dict(posmlp_t=720), reference='a test')
    monkeypatch.setitem(suites.SUITES, 'comparison', tiny_suite)
    alive, most = [0], [0]

    class CountedBench(benchmarking.ModelBench):
        def __init__(self, *args):
            super().__init__(*args)
            alive[0] += 1
            most[0] = max(most[0], alive[0])

        def close(self):
            alive[0] -= 1
            super().close()

    monkeypatch.setattr(benchmarking, 'ModelBench', CountedBench)
    models = [] if '--suite' in argv else ['--model', 'posmlp_t', 'posmlp_t_lrpe', '--baseline', 'posmlp_t']
    assert benchmark.main([*models, *argv, '--bench', 'inference', '--no-isolate', *QUICK_ARGS, *TINY_ARGS]) == 0
    assert (most[0], alive[0]) == (most_alive, 0)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('posmlp_t')]
    assert len(lines) == 2 and re.search(r' 1\.00x ', lines[0])  # the baseline against itself


def test_sample_jpegs_have_the_sizes_asked_for(tmp_path):
    from PIL import Image
    loader_benchmark.write_sample_jpegs(tmp_path, 8, 40)
    files = sorted(tmp_path.glob('*/*.jpg'))
    assert len(files) == 8 and {f.parent.name for f in files} == {'class_0', 'class_1'}
    for file in files:
        with Image.open(file) as image:
            assert image.format == 'JPEG' and max(image.size) == 40 and 30 <= min(image.size) <= 40


@pytest.mark.parametrize('source', ['generated', 'folder'])
def test_data_bench_times_the_recipe_transforms_per_worker(source, tmp_path, capsys, in_process_run):
    results = tmp_path / 'data.csv'
    data_args = ['--data-images', '6', '--data-long-side', '48']
    if source == 'folder':
        data_args = ['--data-dir', str(make_image_folder(tmp_path / 'images', per_class=2, splits=('train',)) / 'train')]
    code = benchmark.main(['--bench', 'data', *data_args, '--img-size', '32', '-b', '2', '-j', '2', '--repeats', '2',
                           '--steps', '1', '--results-file', str(results)])
    out = capsys.readouterr().out
    assert code == 0 and 'img/s per core' in out
    with results.open() as file:
        rows = list(csv.DictReader(file))
    assert [(row['transform'], row['workers']) for row in rows] == [('train', '1'), ('train', '2'), ('eval', '1'),
                                                                     ('eval', '2')]
    for row in rows:
        assert float(row['img_per_sec']) > 0 and float(row['cpu_ms_per_img']) > 0
        assert float(row['img_per_sec_per_worker']) == pytest.approx(float(row['img_per_sec']) / int(row['workers']),
                                                                     abs=0.01)
        assert row['img_size'] == '32' and row['recipe'].endswith('posmlp_t.yaml') and row['command']
    assert rows[0]['images_in_folder'] == '6'
    assert rows[0]['data'].startswith('generated JPEGs, 48 px') if source == 'generated' else rows[0]['data'].endswith('train')


def test_data_bench_refuses_a_folder_without_class_folders(tmp_path, capsys):
    from PIL import Image
    Image.new('RGB', (8, 8)).save(tmp_path / 'loose.png')
    assert benchmark.main(['--bench', 'data', '--data-dir', str(tmp_path), '--img-size', '32', '-j', '1']) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('benchmark.py: error: ') and 'one subfolder per class' in err[-1]


def readme_benchmark_commands() -> list:
    """The benchmark.py command lines of README.md, as argument lists (environment settings left out)."""
    text = (ROOT / 'README.md').read_text().replace('\\\n', ' ')
    lines = re.findall(r'^\s*(?:[A-Z_]+=\S+\s+)*python3 benchmark\.py .*$', text, re.M)
    return [shlex.split(line.split('benchmark.py', 1)[1], comments=True) for line in lines]


def test_readme_benchmark_commands_parse(tmp_path):
    # The authors' model code is not part of the repository (README says so): a stand-in registers its name,
    # and so do stand-ins for suite models this branch does not register yet.
    (tmp_path / 'authors_posmlp').mkdir()
    (tmp_path / 'authors_posmlp' / '__init__.py').write_text('')
    (tmp_path / 'authors_posmlp' / 'posmlp.py').write_text(
        'from timm.models import register_model\nfrom timm.models.mlp_mixer import gmlp_s16_224\n\n\n'
        '@register_model\ndef authors_posmlp_t(pretrained=False, **kwargs):\n    return gmlp_s16_224(**kwargs)\n')
    commands = readme_benchmark_commands()
    assert len(commands) >= 4 and any('--suite' in argv for argv in commands)
    if not torch.cuda.is_available():  # the GPU commands' other options are checked all the same
        commands = [['cpu' if arg.startswith('cuda') else arg for arg in argv] for argv in commands]
    # Folders the README names as examples (/imagenet/train) stand for the reader's own.
    commands = [[str(tmp_path) if i and argv[i - 1] == '--data-dir' else arg for i, arg in enumerate(argv)]
                for argv in commands]
    script = (
        'import timm, timm.models, benchmark\n'
        'for name in benchmark.SUITES["comparison"].models:\n'
        '    if not timm.is_model(name):\n'
        '        def stand_in(pretrained=False, **kwargs):\n'
        '            return timm.create_model("gmlp_s16_224", **kwargs)\n'
        '        stand_in.__name__ = name\n'
        '        timm.models.register_model(stand_in)\n'
        f'for argv in {commands!r}:\n'
        '    benchmark.parse_args(argv)\n')
    done = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)])))
    assert done.returncode == 0, done.stderr
