"""benchmark.py end to end on a tiny PosMLP (32 px, one block per stage), plus its entry syntax."""
import csv
import json
import multiprocessing
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_KWARGS

import benchmark

TINY_ARGS = ['--img-size', str(TINY_KWARGS['img_size']), '--model-kwargs'] + [
    f'{key}={"(" + ",".join(map(str, value)) + ")"}' for key, value in TINY_KWARGS.items() if key != 'img_size'
]
QUICK_ARGS = ['--batch-size', '2', '--warmup', '1', '--repeats', '2', '--steps', '1', '--threads', '1']
NUMBER_COLUMNS = ('img_per_sec', 'img_per_sec_min', 'img_per_sec_max', 'ms_per_step', 'cpu_ms_per_step', 'params_m',
                  'gmacs', 'peak_mem_mb')
COLUMNS = ('model', 'setting', 'mode', 'batch_size', 'img_size', 'dtype') + NUMBER_COLUMNS


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / 'benchmark.py'), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


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
                         '--results-file', str(results))
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
