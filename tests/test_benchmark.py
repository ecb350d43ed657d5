"""benchmark.py end to end on a tiny PosMLP (32 px, one block per stage), plus its entry syntax."""
import csv
import json
import multiprocessing
import os
import subprocess
import sys

import pytest
import timm
import torch

from conftest import ROOT, TINY_KWARGS, restored_process_state

import benchmark

TINY_ARGS = ['--img-size', str(TINY_KWARGS['img_size']), '--model-kwargs'] + [
    f'{key}={"(" + ",".join(map(str, value)) + ")"}' for key, value in TINY_KWARGS.items() if key != 'img_size'
]
QUICK_ARGS = ['--batch-size', '2', '--warmup', '1', '--repeats', '2', '--steps', '1', '--threads', '1']
NUMBER_COLUMNS = ('img_per_sec', 'img_per_sec_min', 'img_per_sec_max', 'ms_per_step', 'cpu_ms_per_step', 'params_m',
                  'gmacs', 'peak_mem_mb')
COLUMNS = ('model', 'setting', 'mode', 'batch_size', 'img_size', 'dtype') + NUMBER_COLUMNS


def run_benchmark(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / 'benchmark.py'), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, **env))


def check_row(row: dict, mode: str, setting: str, memory_reported: bool = True):
    assert (row['model'], row['setting'], row['mode']) == ('posmlp_t', setting, mode)
    assert int(row['batch_size']) == 2 and int(row['img_size']) == 32 and row['dtype'] == 'float32'
    for column in NUMBER_COLUMNS:
        if column == 'peak_mem_mb' and not memory_reported:
            assert row[column] is None  # tasks sharing a process: their memory is not attributable
        else:
            assert float(row[column]) > 0, (column, row)
    assert float(row['img_per_sec_min']) <= float(row['img_per_sec']) <= float(row['img_per_sec_max'])


def test_infer_and_train_in_workers_write_csv(tmp_path):
    results = tmp_path / 'results.csv'
    done = run_benchmark('--model', 'posmlp_t', '--bench', 'both', *QUICK_ARGS, *TINY_ARGS,
                         '--results-file', str(results), MALLOC_ARENA_MAX='2')
    assert done.returncode == 0, done.stderr
    header, *lines = done.stdout.strip().splitlines()[1:]
    assert header.split()[:3] == ['model', 'setting', 'mode'] and 'peak' in header
    assert [line.split()[2] for line in lines] == ['infer', 'train']
    with results.open() as file:
        rows = list(csv.DictReader(file))
    assert set(COLUMNS) <= set(rows[0])
    for row, mode in zip(rows, ('infer', 'train')):
        check_row(row, mode, 'default')
    assert rows[1]['optimizer'] == 'sgd'
    assert len(rows[0]['round_img_per_sec'].split()) == 2
    # Each line says how and where it was measured, allocator settings included.
    assert rows[0]['command'].startswith('python3 benchmark.py --model posmlp_t') and rows[0]['torch']
    assert rows[0]['warmup'] == '1' and rows[0]['torch_threads'] == '1'
    assert json.loads(rows[0]['env_vars'])['MALLOC_ARENA_MAX'] == '2'


def test_entry_settings_in_one_process_write_json(tmp_path):
    results = tmp_path / 'results.json'
    done = run_benchmark('--model', 'posmlp_t', 'posmlp_t:gate_impl=reference', 'posmlp_t:gate_impl=fast@bf16',
                         '--bench', 'infer', '--no-isolate', '--baseline', 'posmlp_t:gate_impl=reference',
                         *QUICK_ARGS, *TINY_ARGS, '--results-file', str(results))
    assert done.returncode == 0, done.stderr
    assert 'gate_impl=reference' in done.stdout and 'vs base' in done.stdout and 'not reported' in done.stdout
    report = json.loads(results.read_text())
    assert report['environment']['torch'] and report['environment']['command'].startswith('python3 ')
    rows = report['results']
    assert [(r['setting'], r['dtype']) for r in rows] == [
        ('default', 'float32'), ('gate_impl=reference', 'float32'), ('gate_impl=fast', 'bfloat16')]
    assert rows[1]['speed_vs_baseline'] == 1 and rows[0]['speed_vs_baseline'] > 0
    assert rows[1]['model_kwargs']['gate_impl'] == 'reference'
    assert rows[1]['model_kwargs']['embed_dims'] == [8, 16, 16, 32]
    check_row(rows[1], 'infer', 'gate_impl=reference', memory_reported=False)


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
    gmacs = benchmark.count_gmacs(model, (3, 64, 64), torch.device('cpu'), torch.contiguous_format)
    assert round(gmacs * 1e9) == analytic_macs(kwargs)


def test_reparam_times_the_fused_model_for_inference_only():
    _, specs, config = benchmark.parse_args(['--model', 'posmlp_t', '--reparam', *QUICK_ARGS, *TINY_ARGS])
    with restored_process_state():
        infer, train = (benchmark.ModelBench(benchmark.Task(specs[0], mode), config) for mode in ('infer', 'train'))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in infer.run_model.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in train.run_model.modules())
    assert infer.gmacs < train.gmacs  # the fused model's maps are stored, not made


def test_input_size_follows_the_entry_model_arguments():
    kwargs = dict(TINY_KWARGS, img_size=64, in_chans=1)
    model = timm.create_model('posmlp_t', **kwargs)
    assert benchmark.benchmark_input_size(model, kwargs, None) == (1, 64, 64)
    assert benchmark.benchmark_input_size(model, kwargs, 48) == (1, 48, 48)  # --img-size wins
    assert benchmark.benchmark_input_size(model, dict(kwargs, img_size=(64, 96)), None) == (1, 64, 96)
    assert benchmark.benchmark_input_size(model, {}, None) == (3, 224, 224)  # the model's data config


def rows_from_round_times(*seconds_per_entry):
    """Result rows of entries whose rounds took these wall times (batch 2, one step per round)."""
    _, specs, config = benchmark.parse_args(['--model', 'posmlp_t', 'posmlp_t:gate_impl=reference', *QUICK_ARGS])
    tasks = [benchmark.Task(spec, 'infer') for spec in specs]
    info = dict(img_size=32, dtype='float32', params_m=1., gmacs=1.)
    rows = [benchmark.result_row(task, info, [(wall, wall) for wall in seconds], None, config)
            for task, seconds in zip(tasks, seconds_per_entry)]
    benchmark.add_speed_vs_baseline(rows, tasks, tasks[0].spec)
    return rows


def test_rectangular_inputs_are_reported_as_such():
    model_kwargs = TINY_ARGS[TINY_ARGS.index('--model-kwargs'):]  # without --img-size
    _, specs, config = benchmark.parse_args(['--model', 'posmlp_t:img_size=(32, 64)', *QUICK_ARGS, *model_kwargs])
    runner = benchmark.InProcessRunner(benchmark.Task(specs[0], 'infer'), config)
    assert runner.prepare()['img_size'] == '32x64'


def test_speed_vs_baseline_is_the_median_of_per_round_ratios():
    base, other = rows_from_round_times([0.2, 0.1, 0.05], [2 / 15, 0.1, 0.02])  # 10, 20, 40 and 15, 20, 100 img/s
    # Per-round ratios 1.5, 1.0 and 2.5: their median, not the ratio of the medians (1.0).
    assert other['speed_vs_baseline'] == pytest.approx(1.5) and base['speed_vs_baseline'] == 1.0
    # From the rates as measured, not as rounded for the results file (0.0004 and 0.0006 img/s round to 0.0 and 0.001).
    _, slow = rows_from_round_times([5000., 5000.], [10000 / 3, 10000 / 3])
    assert slow['speed_vs_baseline'] == pytest.approx(1.5)
    # Rounded once, for the table: 1.1346 is 1.13x (rounding to 1.135 first would print 1.14x).
    _, near = rows_from_round_times([1.], [1 / 1.1346])
    assert benchmark.format_cell('speed_vs_baseline', near) == '1.13x'


def test_model_error_in_a_worker_names_the_entry():
    # The worker loop runs here on one end of a pipe, as a worker process would run it.
    parent_end, worker_end = multiprocessing.Pipe()
    _, specs, config = benchmark.parse_args(['--model', 'posmlp_t:no_such_arg=1', *QUICK_ARGS, *TINY_ARGS])
    parent_end.send('prepare')
    benchmark.worker_main(worker_end, benchmark.Task(specs[0], 'infer'), config)
    status, message = parent_end.recv()
    assert status == 'error' and 'no_such_arg' in message and 'keyword names' in message


def test_import_adds_models_registered_elsewhere(tmp_path):
    (tmp_path / 'other_models.py').write_text(
        'import torch\n'
        'from timm.models import register_model\n\n\n'
        'class TinyMLP(torch.nn.Sequential):\n'
        '    num_classes = 10\n\n\n'
        '@register_model\n'
        'def other_tiny_mlp(pretrained=False, **kwargs):\n'
        '    return TinyMLP(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))\n'
    )
    done = subprocess.run(
        [sys.executable, str(ROOT / 'benchmark.py'), '--import', 'other_models', '--model', 'other_tiny_mlp',
         '--img-size', '32', '--bench', 'train', *QUICK_ARGS],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert done.returncode == 0, done.stderr
    row = done.stdout.strip().splitlines()[-1].split()
    assert row[:3] == ['other_tiny_mlp', 'default', 'train']


def test_entry_syntax():
    spec = benchmark.parse_model_spec('posmlp_t:gate_impl=reference,embed_dims=(8, 16),drop_rate=0.1@bf16')
    assert spec.model == 'posmlp_t' and spec.dtype == 'bfloat16'
    assert dict(spec.kwargs) == dict(gate_impl='reference', embed_dims=(8, 16), drop_rate=0.1)
    assert spec.setting == 'gate_impl=reference,embed_dims=(8, 16),drop_rate=0.1'
    plain = benchmark.parse_model_spec('gmlp_s16_224')
    assert (plain.kwargs, plain.dtype, plain.setting) == ((), None, 'default')
    assert benchmark.parse_model_spec('posmlp_t@float32').dtype == 'float32'


@pytest.mark.parametrize('text, problem', [
    ('posmlp_t:gate_impl', 'not KEY=VALUE'),
    ('posmlp_t:', 'nothing after ":"'),
    ('posmlp_t@fp8', "unknown dtype 'fp8'"),
    (':gate_impl=fast', 'no model name'),
    ('posmlp_t:a=1,a=2', 'given twice'),
])
def test_bad_entries_name_the_problem(text, problem):
    with pytest.raises(ValueError, match=problem):
        benchmark.parse_model_spec(text)


@pytest.mark.parametrize('args, problem', [
    (['--model', 'posmlp_tt'], "unknown model 'posmlp_tt'; did you mean posmlp_t"),
    (['--model', 'posmlp_t', '--results-file', 'out.txt'], 'name it .csv or .json'),
    (['--model', 'posmlp_t', '--repeats', '0'], '--repeats must be at least 1'),
    (['--model', 'posmlp_t', 'posmlp_t'], 'listed twice'),
    (['--model', 'posmlp_t', '--baseline', 'gmlp_s16_224'], 'not one of the --model entries'),
    (['--model', 'posmlp_t', '--model-kwargs', 'pretrained=True'], 'never downloaded'),
    (['--import', 'no_such_module', '--model', 'posmlp_t'], 'put the folder that holds it on PYTHONPATH'),
])
def test_bad_arguments_name_the_problem(args, problem, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(args)
    assert exit_info.value.code == 2 and problem in capsys.readouterr().err


def test_b_is_short_for_batch_size():
    assert benchmark.parse_args(['--model', 'posmlp_t', '-b', '7'])[2].batch_size == 7
