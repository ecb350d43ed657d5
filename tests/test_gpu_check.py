"""The GPU check (tests/gpu/gpu_check.py) on a CPU: it reports its parts as skipped without CUDA, the
commands of a GPU run are valid, and its training and DDP parts run here with a tiny model."""
import json
import shlex
import sys

import pytest
import torch

from conftest import ROOT, script_env

sys.path.insert(0, str(ROOT / 'tests' / 'gpu'))
import gpu_check  # noqa: E402


def test_without_cuda_every_part_is_one_skip_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert gpu_check.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    parts = [part.name for part in gpu_check.PARTS]
    assert lines[:len(parts)] == [f'{name}: skipped, needs CUDA' for name in parts]
    assert len(lines) == len(parts) + 1 and '--cpu-smoke' in lines[-1]


def cpu_argv(argv):
    """A GPU command's arguments with the device made the CPU, so that its parser accepts them here."""
    return ['cpu' if arg == 'cuda' else arg for arg in argv]


def test_commands_of_a_gpu_run_are_valid(tmp_path, capsys):
    import benchmark
    import ddp_step
    import validate
    from utils.args import parse_train_args

    profile = gpu_check.gpu_profile()
    runs = gpu_check.benchmark_commands(profile, tmp_path)
    assert len(runs) == 5
    for argv in runs:
        args, tasks, _, config = benchmark.parse_args(cpu_argv(argv[2:]))
        assert argv[argv.index('--results-file') + 1].startswith(str(tmp_path))
    assert config.batch_size == 32 and args.suite == 'comparison'
    models = {task.entry.model for argv in runs[:4] for task in benchmark.parse_args(cpu_argv(argv[2:]))[1]}
    assert models == {'posmlp_t', 'gmlp_s16_224', 'resmlp_24_224', 'swin_tiny_patch4_window7_224', 'convnext_tiny'}

    commands = gpu_check.train_commands(profile, tmp_path / 'data', tmp_path / 'output', tmp_path / 'kept')
    assert commands['train'][:3] == ['bash', 'distributed_train.sh', '1']
    args = parse_train_args(cpu_argv(commands['train'][3:]))
    assert (args.model, args.epochs, args.cooldown_epochs, args.amp, args.model_ema) == ('posmlp_t', 2, 0, True, True)
    validate.validate_parser().parse_args(cpu_argv(commands['validate'][2:]))
    assert ddp_step.parse_args(list(profile.ddp_options)).backend == 'nccl'

    gpu_check.main(['--dry-run'])
    printed = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if not line.startswith('#')]
    assert len(printed) == 5 + 2 + 1 + 3


def test_cpu_smoke_run_trains_resumes_and_validates(tmp_path):
    out = tmp_path / 'out'
    assert gpu_check.main(['--cpu-smoke', '--parts', 'train', '--out', str(out)]) == 0
    summary = (out / 'summary.md').read_text()
    assert '| train | pass |' in summary and 'validate.py --amp gives' in summary
    for name in ('train.log', 'summary.csv', 'args.yaml', 'args-resume-epoch2.yaml', 'validate.json'):
        assert (out / 'train_run' / name).exists(), name
    assert 'train: $ bash distributed_train.sh 1' in (out / 'gpu_check.log').read_text()


def test_a_failing_part_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(check, deadline):
        raise gpu_check.PartFailed('the check of this part failed')

    def passing(check, deadline):
        return ['ran']

    parts = (gpu_check.Part('first', broken, 10), gpu_check.Part('second', passing, 10))
    monkeypatch.setattr(gpu_check, 'PARTS', parts)
    assert gpu_check.main(['--cpu-smoke', '--out', str(tmp_path)]) == 1
    summary = (tmp_path / 'summary.md').read_text()
    assert '| first | fail |' in summary and 'the check of this part failed' in summary
    assert '| second | pass |' in summary


@pytest.mark.filterwarnings('ignore:Grad strides do not match bucket view strides')  # as train.py does
def test_ddp_step_trains_on_cpu_with_gloo(tmp_path, monkeypatch):
    import ddp_step
    env = script_env()
    for name, value in dict(MASTER_ADDR='127.0.0.1', MASTER_PORT=env['MASTER_PORT'], RANK='0', LOCAL_RANK='0',
                            WORLD_SIZE='1').items():
        monkeypatch.setenv(name, value)
    result = tmp_path / 'ddp.json'
    status = ddp_step.main(['--device', 'cpu', '--backend', 'gloo', '--smoke', '--steps', '4', '-b', '8',
                            '--result', str(result)])
    measured = json.loads(result.read_text())
    assert status == 0, measured['failed_checks']
    assert measured['backend'] == 'gloo' and measured['updates'] == 6 and measured['no_sync_micro_steps'] == 6


def test_benchmark_tables_hold_every_run(tmp_path):
    def row(model, mode, dtype='float16', batch=128, setting='default', vs_base=None, **extra):
        return dict(model=model, setting=setting, mode=mode, batch_size=batch, dtype=dtype, img_per_sec=1000.4,
                    peak_mem_mb=2048.0, speed_vs_baseline=vs_base, params_m=20.9, gmacs=5.18, **extra)

    (tmp_path / 'b128.json').write_text(json.dumps(dict(environment={}, results=[
        row('posmlp_t', 'infer', vs_base=1.25), row('posmlp_t', 'infer', setting='gate_impl=reference', vs_base=1.0),
        row('convnext_tiny', 'infer', vs_base=1.5)])))
    (tmp_path / 'b32.json').write_text(json.dumps(dict(environment={}, results=[
        row('vip_s7', 'infer', batch=32, vs_base=1.0, paper_img_per_sec=719, paper_vs_baseline=1.0),
        row('posmlp_t', 'infer', batch=32, vs_base=0.9, paper_img_per_sec=None, paper_vs_baseline=None)])))
    lines = gpu_check.benchmark_tables([tmp_path / 'b128.json', tmp_path / 'b32.json', tmp_path / 'missing.json'])
    text = '\n'.join(lines)
    assert '| posmlp_t (gate_impl=reference) | 1000 (2048 MB) |' in text
    assert 'median of per-round ratios: infer float16 b128 1.25x.' in text
    assert '| vip_s7 | 20.9 | 5.18 | 1000 | 1.00x | 719 | 1.0 |' in text
    assert '| posmlp_t | 20.9 | 5.18 | 1000 | 0.90x | - | - |' in text
