"""distributed_train.sh: single-node jobs sharing a host each get a free port; several nodes meet at
MASTER_ADDR:MASTER_PORT, as the README documents."""
import subprocess

import pytest

from conftest import ROOT, TINY_MODEL_ARGS, make_image_folder, script_env

ARGS_PRINTER = '#!/bin/sh\nprintf "%s\\n" "$@"\n'
RENDEZVOUS_VARIABLES = ('NNODES', 'NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT')


def launch_env(**variables) -> dict:
    """script_env without any rendezvous variable but `variables`."""
    env = {k: v for k, v in script_env().items() if k not in RENDEZVOUS_VARIABLES}
    return dict(env, **variables)


@pytest.mark.parametrize('variables, expected', [
    ({}, ['--standalone']),
    ({'NNODES': '1'}, ['--standalone']),
    ({'MASTER_PORT': '29611'}, ['--nnodes=1', '--node_rank=0', '--master_addr=127.0.0.1', '--master_port=29611']),
    ({'NNODES': '2', 'NODE_RANK': '1', 'MASTER_ADDR': '10.0.0.1', 'MASTER_PORT': '29500'},
     ['--nnodes=2', '--node_rank=1', '--master_addr=10.0.0.1', '--master_port=29500']),
    ({'NNODES': '2', 'NODE_RANK': '1', 'MASTER_ADDR': '10.0.0.1'},
     ['--nnodes=2', '--node_rank=1', '--master_addr=10.0.0.1', '--master_port=29500']),
])
def test_torchrun_gets_a_free_port_on_one_node_and_the_given_address_across_nodes(tmp_path, variables, expected):
    printer = tmp_path / 'python'
    printer.write_text(ARGS_PRINTER)
    printer.chmod(0o755)
    result = subprocess.run(['bash', str(ROOT / 'distributed_train.sh'), '8', '/imagenet', '-b', '128'],
                            env=launch_env(PYTHON=str(printer), **variables), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['-m', 'torch.distributed.run', *expected, '--nproc_per_node=8',
                                     str(ROOT / 'train.py'), '/imagenet', '-b', '128']


def start_training(data, out, experiment: str, num_proc: int, **variables) -> subprocess.Popen:
    command = ['bash', str(ROOT / 'distributed_train.sh'), str(num_proc), str(data), *TINY_MODEL_ARGS, '-b', '2',
               '-j', '0', '--threads', '1', '--epochs', '1', '--max-steps-per-epoch', '1', '--mixup', '0',
               '--cutmix', '0', '--output', str(out), '--experiment', experiment]
    return subprocess.Popen(command, env=launch_env(**variables), cwd=out.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(jobs: dict):
    for name, job in jobs.items():
        output, _ = job.communicate(timeout=300)
        assert job.returncode == 0, f'{name}:\n{output[-3000:]}'


def test_two_single_node_jobs_on_one_host_run_at_once(tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=2)
    out = tmp_path / 'out'
    # Two processes each, so each job's processes meet at its rendezvous while the other job holds its own.
    finish({name: start_training(data, out, name, 2) for name in ('first', 'second')})
    assert all((out / name / 'last.pth.tar').exists() for name in ('first', 'second'))



@pytest.mark.parametrize('num_proc, expected', [('abc', None), ('0', None), ('1', []), ('2', ['-m', 'torch.distributed.run'])])
def test_eval_sh_runs_the_processes_asked_for_and_refuses_other_counts(tmp_path, num_proc, expected):
    printer = tmp_path / 'python'
    printer.write_text(ARGS_PRINTER)
    printer.chmod(0o755)
    result = subprocess.run(['bash', str(ROOT / 'eval.sh'), '/val', 'ckpt'],
                            env=launch_env(PYTHON=str(printer), NUM_PROC=num_proc), capture_output=True, text=True)
    if expected is None:
        assert result.returncode == 2 and f'NUM_PROC={num_proc} is not a number of processes' in result.stderr
    else:
        assert result.returncode == 0 and result.stdout.split()[:len(expected)] == expected
        assert result.stdout.split()[-3:] == ['/val', '--checkpoint', 'ckpt']
