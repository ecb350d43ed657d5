#!/usr/bin/env python3
"""The GPU check: the project's CUDA paths on one GPU, in one command, with the results kept under logs/.

    python3 tests/gpu/gpu_check.py              # on a CUDA machine; writes logs/gpu_check_YYYY-MM-DD/
    python3 tests/gpu/gpu_check.py --cpu-smoke  # every part on the CPU with a tiny model: checks the check
    python3 tests/gpu/gpu_check.py --dry-run    # prints the commands of a GPU run

Parts, in the order they run; each runs whatever happened to the others, under its own time limit and a
limit for the whole check (--time-limit):
  benchmark  benchmark.py, alone on the machine: posmlp_t (fast and reference gate), gmlp_s16_224,
             resmlp_24_224, swin_tiny_patch4_window7_224 and convnext_tiny at batch 128 under float16
             and bfloat16 autocast; the paper's comparison table (--suite comparison, with swin and
             convnext added) at its batch of 32
  compile    tests/gpu/test_gpu_compile.py: torch.compile equals eager; runs beside the next three
  gate       tests/gpu/test_gpu_gate.py: fast vs reference gate in float32, float16 and bfloat16 (outputs,
             gradients), evaluation without autograd, cached maps, fused model
  ddp        tests/gpu/ddp_step.py under torchrun: DDP on NCCL, float16 loss scaling, clipping,
             accumulation and EMA through the project's training step
  train      distributed_train.sh 1 with configs/posmlp_t.yaml for two short epochs on generated JPEGs,
             then train.py --resume last.pth.tar --epochs 3, then validate.py --amp on last.pth.tar
The output folder holds this script's log (gpu_check.log), the commands' output (part_NAME.log),
nvidia-smi.txt, the measured errors (gate.jsonl, compile.jsonl), ddp.json, the training run's logs
(train_run/), the benchmark results files and summary.md, the tables for README. Without CUDA each
part is one line, "skipped, needs CUDA", and the exit status is 0; with CUDA it is 1 when a part failed.
"""
import argparse
import csv
import dataclasses
import datetime
import json
import logging
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PYTHON = sys.executable
_logger = logging.getLogger('gpu_check')

REFERENCE_GATE = 'posmlp_t gate_impl=reference'
BENCHMARK_MODELS = ('posmlp_t', REFERENCE_GATE, 'gmlp_s16_224', 'resmlp_24_224', 'swin_tiny_patch4_window7_224',
                    'convnext_tiny')
TRAIN_EXPERIMENT = 'posmlp_t'
BENCHMARK_RESERVE = 40  # seconds kept for each benchmark run still to come


@dataclasses.dataclass(frozen=True)
class Profile:
    """The sizes of a run: the GPU check's, or the CPU smoke run's tiny ones."""
    device: str
    train_images: int
    val_images: int
    image_long_side: int
    train_options: tuple  # beyond the recipe, the epochs and the output
    batch_size: int
    loader_options: tuple  # train.py's and validate.py's
    ddp_options: tuple
    benchmark_runs: tuple  # (results file name, benchmark.py options)


def gpu_profile() -> Profile:
    timing = ('--warmup', '3', '--repeats', '5')
    runs = []
    for dtype in ('float16', 'bfloat16'):
        # Inference and training apart: each task holds its GPU memory until its run ends, and the training
        # tasks at batch 128 take tens of GB together.
        for bench in ('inference', 'train'):
            runs.append((f'benchmark_b128_{dtype}_{bench}.json',
                         ('--model', *BENCHMARK_MODELS, '--baseline', REFERENCE_GATE, '--bench', bench, '-b', '128',
                          '--amp-dtype', dtype, '--steps', '5', *timing)))
    runs.append(('benchmark_b32_comparison.json',
                 ('--suite', 'comparison', '--model', *BENCHMARK_MODELS[-2:], '--bench', 'inference', '-b', '32',
                  '--amp-dtype', 'float16', '--steps', '10', *timing)))
    return Profile(device='cuda', train_images=256, val_images=64, image_long_side=320,
                   train_options=('--max-steps-per-epoch', '3'), batch_size=64, loader_options=('-j', '8'),
                   ddp_options=('--device', 'cuda', '--backend', 'nccl'),
                   benchmark_runs=tuple((name, ('--device', 'cuda', *options)) for name, options in runs))


def smoke_profile() -> Profile:
    sys.path.insert(0, str(HERE.parent))
    from conftest import TINY_MODEL_ARGS  # --model-kwargs for a 32 px model of a few thousand parameters
    return Profile(device='cpu', train_images=32, val_images=16, image_long_side=48,
                   train_options=('--img-size', '32', *TINY_MODEL_ARGS, '--max-steps-per-epoch', '2', '--threads', '1'),
                   # timm's prefetcher, as on CUDA: uint8 batches, mixup in the collate, normalised after.
                   batch_size=8, loader_options=('-j', '0', '--prefetcher'),
                   ddp_options=('--device', 'cpu', '--backend', 'gloo', '--smoke'),
                   benchmark_runs=(('benchmark_smoke.json',
                                    ('--device', 'cpu', '--model', *BENCHMARK_MODELS[:2], '--baseline', REFERENCE_GATE,
                                     *TINY_MODEL_ARGS, '-b', '2', '--warmup', '0', '--repeats', '2', '--steps', '1',
                                     '--no-isolate')),))


class PartFailed(Exception):
    """A check of a part failed; the message says which and by how much, `details` what was measured."""

    def __init__(self, message: str, details: List[str] = ()):
        super().__init__(message)
        self.details = list(details)


class PartTimedOut(Exception):
    """A command ran past its part's time limit (or the check's) and was stopped."""


@dataclasses.dataclass
class PartResult:
    name: str
    status: str  # pass, fail or timeout
    seconds: float
    details: List[str]


class Check:
    """One run of the check: its profile, folders and time limits, and the commands it has running."""

    def __init__(self, profile: Profile, out: Path, work: Path, time_limit: float):
        self.profile, self.out, self.work = profile, out, work
        self.deadline = time.monotonic() + time_limit
        self.running = set()
        self.lock = threading.Lock()

    def env(self, **extra) -> Dict[str, str]:
        return dict(os.environ, PYTHON=PYTHON, **extra)

    def command(self, argv: List[str], log_name: str, part_deadline: float, limit: Optional[float] = None,
                env: Optional[Dict[str, str]] = None) -> int:
        """Run argv from the repository root, its output appended to part_LOG_NAME.log; its exit status. Past the
        part's deadline, the check's, or `limit` seconds, its process group is stopped (PartTimedOut)."""
        timeout = min(part_deadline, self.deadline) - time.monotonic()
        if limit is not None:
            timeout = min(timeout, limit)
        if timeout <= 1:
            raise PartTimedOut(f'no time left for {shlex.join(argv[:3])} ...')
        _logger.info(f'{log_name}: $ {shlex.join(argv)}')
        start = time.monotonic()
        with open(self.part_log(log_name), 'a') as log:
            log.write(f'\n$ {shlex.join(argv)}\n')
            log.flush()
            process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env or self.env(),
                                       start_new_session=True)
            with self.lock:
                self.running.add(process)
            try:
                status = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop(process)
                raise PartTimedOut(f'{shlex.join(argv[:4])} ... stopped after {timeout:.0f} s') from None
            except KeyboardInterrupt:
                stop(process)
                raise
            finally:
                with self.lock:
                    self.running.discard(process)
        _logger.info(f'{log_name}: exit status {status} after {time.monotonic() - start:.0f} s')
        return status

    def part_log(self, name: str) -> Path:
        return self.out / f'part_{name}.log'

    def stop_all(self):
        with self.lock:
            for process in list(self.running):
                stop(process)


def stop(process: subprocess.Popen):
    """Stop a command and what it started in its process group: politely, then for good."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:  # none of the group is left
            return
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


def read_jsonl(path: Path) -> List[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Parts. Each takes the check and its own deadline, returns the lines summary.md shows for it, and raises
# PartFailed or PartTimedOut.

def run_pytest_part(check: Check, deadline: float, name: str, test_file: str) -> List[str]:
    record = check.out / f'{name}.jsonl'
    record.unlink(missing_ok=True)  # of an earlier check in the same folder
    env = check.env(GPU_CHECK_DEVICE=check.profile.device, GPU_CHECK_RECORD=str(record))
    status = check.command(pytest_command(test_file), name, deadline, env=env)
    rows = read_jsonl(record)
    details = error_table(rows)
    if status != 0:
        failed = [line for line in check.part_log(name).read_text().splitlines()
                  if line.startswith(('FAILED ', 'ERROR '))]
        raise PartFailed(f'pytest exit status {status}; see part_{name}.log', failed + [''] + details)
    if not rows:
        raise PartFailed(f'pytest passed but measured nothing ({record.name} is empty): were the tests skipped?')
    return details


def pytest_command(test_file: str) -> List[str]:
    return [PYTHON, '-m', 'pytest', '-v', '-p', 'no:cacheprovider', str(HERE / test_file)]


def error_table(rows: List[dict]) -> List[str]:
    """The largest error measured in each precision, for outputs and for gradients, beside its tolerance."""
    worst = {}
    for row in rows:
        if row.get('tolerance') is None:
            continue
        words = row['case'].split()
        precision = next((w for w in words if w.split('-')[0] in ('float32', 'float16', 'bfloat16')), 'float32')
        if 'bfloat16' in row['metric']:
            precision = 'bfloat16'
        kind = 'gradients' if 'gradient' in row['metric'] else 'outputs'
        key = (precision, kind)
        if key not in worst or row['value'] / row['tolerance'] > worst[key]['value'] / worst[key]['tolerance']:
            worst[key] = row
    lines = ['| precision | compared | largest relative error | tolerance | where |', '|---|---|---|---|---|']
    for (precision, kind), row in sorted(worst.items()):
        lines.append(f'| {precision} | {kind} | {row["value"]:.2e} | {row["tolerance"]:.0e} | '
                     f'{row["case"]}: {row["metric"]} |')
    return lines if worst else []


def part_gate(check: Check, deadline: float) -> List[str]:
    details = run_pytest_part(check, deadline, 'gate', 'test_gpu_gate.py')
    fused = [row for row in read_jsonl(check.out / 'gate.jsonl') if row['metric'] == 'model has fuse()']
    if fused and not any(row['value'] for row in fused):
        details.append('The model has no fuse() in this version: the fused model is timm\'s reparameterize_model, '
                       'which leaves this model as it is.')
    return details


def part_compile(check: Check, deadline: float) -> List[str]:
    return run_pytest_part(check, deadline, 'compile', 'test_gpu_compile.py')


def part_ddp(check: Check, deadline: float) -> List[str]:
    result_path = check.out / 'ddp.json'
    status = check.command(ddp_command(check.profile, result_path), 'ddp', deadline)
    if not result_path.exists():
        raise PartFailed(f'ddp_step.py exit status {status} without results; see part_ddp.log')
    r = json.loads(result_path.read_text())
    details = [
        f'{r["ddp"]} over {r["world_size"]} process ({r["backend"]}), {r["precision"]}, {r["scaler"]} '
        f'(scale {r["loss_scale"]}), gradients clipped to norm 1 (largest norm after clipping '
        f'{r["max_norm_after_clipping"]:.4f}), {r["updates"]} updates of 2 accumulated steps, EMA.',
        'Training loss per epoch: ' + ', '.join(f'{v:.4f}' for v in r['epoch_losses'])
        + f'; evaluation loss {r["eval_loss_before"]:.4f} before, {r["eval_loss_after"]:.4f} after (not checked: '
        f'after a few steps BatchNorm\'s running statistics lag behind the weights).',
        f'{r["params_changed"]} of {r["params"]} parameters changed, {r["ema_changed"]} EMA parameters moved; '
        f'non-finite: {", ".join(r["non_finite"]) or "none"}.',
    ]
    if status != 0 or r['failed_checks']:
        problem = '; '.join(r['failed_checks']) or f'ddp_step.py exit status {status}; see part_ddp.log'
        raise PartFailed(problem, details)
    return details


def ddp_command(profile: Profile, result_path: Path) -> List[str]:
    return [PYTHON, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '1', str(HERE / 'ddp_step.py'),
            *profile.ddp_options, '--result', str(result_path)]


def summary_rows(path: Path) -> Dict[int, dict]:
    with open(path, newline='') as file:
        return {int(row['epoch']): row for row in csv.DictReader(file)}


def part_train(check: Check, deadline: float) -> List[str]:
    data, output = check.work / 'data', check.work / 'output'
    make_images(data, check.profile)
    kept = check.out / 'train_run'
    commands = train_commands(check.profile, data, output, kept)
    run = output / TRAIN_EXPERIMENT
    kept.mkdir(exist_ok=True)
    try:
        for step, expected_epochs in (('train', [0, 1]), ('resume', [0, 1, 2])):
            status = check.command(commands[step], 'train', deadline)
            if status != 0:
                raise PartFailed(f'{step}: exit status {status}; see part_train.log')
            epochs = summary_rows(run / 'summary.csv')
            if sorted(epochs) != expected_epochs:
                raise PartFailed(f'{step}: summary.csv has epochs {sorted(epochs)}, not {expected_epochs}')
        settings = training_settings((run / 'train.log').read_text(), check.profile.device)
        status = check.command(commands['validate'], 'train', deadline)
        if status != 0:
            raise PartFailed(f'validate.py: exit status {status}; see part_train.log')
    finally:
        for name in ('train.log', 'summary.csv', 'args.yaml', 'args-resume-epoch2.yaml'):
            if (run / name).exists():
                shutil.copy(run / name, kept / name)
    return settings + compare_validation(epochs[2], json.loads((kept / 'validate.json').read_text())['results'][0])


def training_settings(log: str, device: str) -> List[str]:
    """The data path and precision train.log reports; on CUDA, timm's GPU defaults must be on."""
    wanted = ['Resuming', 'timm prefetcher'] + (['pinned memory', 'native AMP (float16)'] if device == 'cuda' else [])
    missing = [text for text in wanted if text not in log]
    if missing:
        raise PartFailed(f'train.log lacks {", ".join(repr(text) for text in missing)}; see train_run/train.log')
    lines = log.splitlines()
    return [next(line.split('] ', 1)[-1].rstrip('.') for line in lines if marker in line) + '.'
            for marker in ('Loading: ', 'Precision: ')] + ['']


def compare_validation(row: dict, validated: dict) -> List[str]:
    """validate.py's top-1 for the last checkpoint against what training recorded for that epoch."""
    prefix = 'ema' if validated['weights'] == 'state_dict_ema' else 'eval'
    logged_top1, logged_loss = float(row[f'{prefix}_top1']), float(row[f'{prefix}_loss'])
    one_image = 100. / validated['images']
    details = [f'Epoch 2 ({prefix} weights, {validated["images"]} images): training logged top-1 {logged_top1:.3f} and '
               f'loss {logged_loss:.4f}; validate.py --amp gives {validated["top1"]:.3f} and {validated["loss"]:.4f} '
               f'(tolerance: one image, {one_image:.3f} points).']
    losses = [float(row[k]) for k in row if k.endswith('loss') and row[k] not in ('', None)]
    if not all(math.isfinite(v) for v in losses + [validated['loss']]):
        raise PartFailed('a non-finite loss: ' + '; '.join(details))
    if abs(validated['top1'] - logged_top1) > one_image + 1e-6:
        raise PartFailed('validate.py disagrees with the training log: ' + '; '.join(details))
    return details


def train_commands(profile: Profile, data: Path, output: Path, kept: Path) -> Dict[str, List[str]]:
    checkpoint = str(output / TRAIN_EXPERIMENT / 'last.pth.tar')
    device, loading = ['--device', profile.device], list(profile.loader_options)
    return {
        'train': ['bash', 'distributed_train.sh', '1', str(data), '-c', 'configs/posmlp_t.yaml', '--epochs', '2',
                  '--cooldown-epochs', '0', '--warmup-epochs', '1', '-b', str(profile.batch_size), *loading,
                  '--log-interval', '1', *device, *profile.train_options, '--output', str(output),
                  '--experiment', TRAIN_EXPERIMENT],
        'resume': [PYTHON, 'train.py', '--resume', checkpoint, '--epochs', '3', *device],
        'validate': [PYTHON, 'validate.py', str(data), '--checkpoint', checkpoint, '--amp',
                     '-b', str(profile.batch_size), *loading, *device, '--results-file', str(kept / 'validate.json')],
    }


def make_images(data: Path, profile: Profile):
    """An ImageNet-style folder of JPEGs: train/ and val/, one folder per class."""
    import project
    _logger.info(f'train: writing {profile.train_images} + {profile.val_images} JPEGs to {data}')
    project.write_sample_jpegs(data / 'train', profile.train_images, profile.image_long_side, seed=0)
    project.write_sample_jpegs(data / 'val', profile.val_images, profile.image_long_side, seed=1)


def benchmark_commands(profile: Profile, out: Path) -> List[List[str]]:
    return [[PYTHON, 'benchmark.py', *options, '--results-file', str(out / name)]
            for name, options in profile.benchmark_runs]


def part_benchmark(check: Check, deadline: float) -> List[str]:
    failed = []
    commands = benchmark_commands(check.profile, check.out)
    for index, argv in enumerate(commands):
        # A slow run may take what is left but BENCHMARK_RESERVE seconds for each run after it.
        limit = min(deadline, check.deadline) - time.monotonic() - BENCHMARK_RESERVE * (len(commands) - index - 1)
        try:
            status = check.command(argv, 'benchmark', deadline, limit=max(limit, BENCHMARK_RESERVE))
            if status != 0:
                failed.append(f'{Path(argv[-1]).name} (exit status {status})')
        except PartTimedOut as e:
            failed.append(f'{Path(argv[-1]).name} ({e})')
    details = benchmark_tables([Path(argv[-1]) for argv in commands])
    if failed:
        raise PartFailed(f'benchmark.py failed: {"; ".join(failed)}; see part_benchmark.log', details)
    return details


def benchmark_tables(paths: List[Path]) -> List[str]:
    rows = []
    for path in paths:
        if path.exists():
            rows += json.loads(path.read_text())['results']
    suite = [row for row in rows if 'paper_img_per_sec' in row]  # a --suite run's rows
    others = [row for row in rows if 'paper_img_per_sec' not in row]
    lines = throughput_table(others) + fast_vs_reference(others)
    return lines + [''] + comparison_table(suite) if suite else lines


def entry_name(row: dict) -> str:
    return row['model'] + ('' if row['setting'] == 'default' else f' ({row["setting"]})')


def throughput_table(rows: List[dict]) -> List[str]:
    """img/s (and peak MB) per model, one column per mode and type."""
    if not rows:
        return []
    columns = sorted({(row['dtype'], row['mode'], row['batch_size']) for row in rows},
                     key=lambda c: (c[2], c[0] != 'float16', c[1]))
    cells = {}
    for row in rows:
        cells[entry_name(row), (row['dtype'], row['mode'], row['batch_size'])] = (
            f'{row["img_per_sec"]:.0f} ({row["peak_mem_mb"]:.0f} MB)' if row.get('peak_mem_mb') is not None
            else f'{row["img_per_sec"]:.0f}')
    names = list(dict.fromkeys(entry_name(row) for row in rows))
    lines = ['| model | ' + ' | '.join(f'{mode} {dtype} b{batch}: img/s (peak MB)' for dtype, mode, batch in columns)
             + ' |', '|---' * (len(columns) + 1) + '|']
    for name in names:
        lines.append(f'| {name} | ' + ' | '.join(cells.get((name, column), '-') for column in columns) + ' |')
    return lines


def fast_vs_reference(rows: List[dict]) -> List[str]:
    """posmlp_t's speed over its reference form's: the median of their per-round ratios (--baseline)."""
    ratios = [f'{row["mode"]} {row["dtype"]} b{row["batch_size"]} {row["speed_vs_baseline"]:.2f}x' for row in rows
              if entry_name(row) == 'posmlp_t' and row.get('speed_vs_baseline') is not None]
    return ['', 'posmlp_t (fast gate) vs its reference form, median of per-round ratios: ' + ', '.join(ratios) + '.'] \
        if ratios else []


def comparison_table(rows: List[dict]) -> List[str]:
    lines = ['| model | params M | GMACs | img/s | vs vip_s7 | paper img/s (V100) | paper vs vip_s7 |',
             '|---|---|---|---|---|---|---|']
    for row in rows:
        paper = row.get('paper_img_per_sec')
        lines.append(f'| {entry_name(row)} | {row["params_m"]:.1f} | {row["gmacs"]:.2f} | {row["img_per_sec"]:.0f} | '
                     f'{row["speed_vs_baseline"]:.2f}x | {paper if paper else "-"} | '
                     f'{row.get("paper_vs_baseline") or "-"} |')
    return lines


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    run: Callable[[Check, float], List[str]]
    timeout: float  # seconds
    beside_next: bool = False  # runs in the background beside the parts after it


PARTS = (
    Part('benchmark', part_benchmark, 360),
    Part('compile', part_compile, 360, beside_next=True),
    Part('gate', part_gate, 180),
    Part('ddp', part_ddp, 150),
    Part('train', part_train, 300),
)


def log_tail(path: Path, lines: int = 8) -> List[str]:
    """The last lines of a part's log, as a block for summary.md."""
    if not path.exists():
        return []
    tail = [line for line in path.read_text(errors='replace').splitlines() if line.strip()][-lines:]
    return [f'Last lines of {path.name}:', '', '```', *tail, '```'] if tail else []


def run_part(check: Check, part: Part, results: Dict[str, PartResult]):
    start = time.monotonic()
    _logger.info(f'{part.name}: started (time limit {part.timeout:.0f} s)')
    status, details = 'pass', []
    try:
        details = part.run(check, start + part.timeout)
    except PartTimedOut as e:
        status, details = 'timeout', [str(e), ''] + log_tail(check.part_log(part.name))
    except PartFailed as e:
        status, details = 'fail', [str(e), ''] + e.details + [''] + log_tail(check.part_log(part.name))
    except Exception as e:  # a bug of the check or an import the project broke: named, and the check goes on
        _logger.exception(f'{part.name}: {type(e).__name__}')
        status, details = 'fail', [f'{type(e).__name__}: {e} (traceback in gpu_check.log)']
    results[part.name] = PartResult(part.name, status, time.monotonic() - start, details)
    _logger.info(f'{part.name}: {status.upper()} after {time.monotonic() - start:.0f} s'
                 + (f': {details[0]}' if status != 'pass' and details else ''))


def run_parts(check: Check, names: List[str]) -> Dict[str, PartResult]:
    results, background = {}, []
    try:
        for part in PARTS:
            if part.name not in names:
                continue
            if part.beside_next:
                thread = threading.Thread(target=run_part, args=(check, part, results), daemon=True)
                thread.start()
                background.append(thread)
            else:
                run_part(check, part, results)
        for thread in background:
            thread.join()
    except KeyboardInterrupt:
        _logger.error('interrupted: stopping the running commands')
        check.stop_all()
        for thread in background:
            thread.join(timeout=30)
    return {part.name: results[part.name] for part in PARTS if part.name in results}


def environment_line(device: str) -> str:
    import torch
    import timm
    if device == 'cuda':
        where = f'{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible), CUDA {torch.version.cuda}'
    else:
        where = f'CPU ({os.cpu_count()} cores)'
    try:
        commit = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:  # no git here
        commit = ''
    return (f'{where}; torch {torch.__version__}, timm {timm.__version__}, Python {sys.version.split()[0]}; '
            f'commit {commit or "unknown"}')


def write_summary(check: Check, results: Dict[str, PartResult], argv: List[str], started: str, seconds: float,
                  names: List[str]):
    lines = [f'# GPU check {started}', '',
             f'`{shlex.join(["python3", "tests/gpu/gpu_check.py", *argv])}`: {seconds / 60:.1f} min. '
             + environment_line(check.profile.device), '',
             '| part | result | time |', '|---|---|---|']
    lines += [f'| {r.name} | {r.status} | {r.seconds:.0f} s |' for r in results.values()]
    lines += [f'| {name} | interrupted | - |' for name in names if name not in results]
    for result in results.values():
        lines += ['', f'## {result.name}: {result.status}', ''] + result.details
    (check.out / 'summary.md').write_text('\n'.join(lines) + '\n')


def save_nvidia_smi(path: Path):
    """The GPU, its driver and its settings (clocks, power limit, MIG), as nvidia-smi reports them."""
    try:
        done = subprocess.run(['nvidia-smi', '-q'], capture_output=True, text=True, timeout=60)
        path.write_text(done.stdout + done.stderr)
    except (OSError, subprocess.TimeoutExpired) as e:
        _logger.warning(f'nvidia-smi: {e}')


def output_folder(requested: Optional[str], smoke: bool) -> Path:
    if requested:
        folder = Path(requested)
    elif smoke:
        return Path(tempfile.mkdtemp(prefix='gpu_check_smoke_'))
    else:
        base = ROOT / 'logs' / f'gpu_check_{datetime.date.today().isoformat()}'
        folder, index = base, 1
        while folder.exists():
            index += 1
            folder = base.with_name(f'{base.name}_{index}')
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def setup_logging(out: Path):
    """Progress lines, with the seconds since the start, to the console and to gpu_check.log."""
    start = time.monotonic()

    class Elapsed(logging.Formatter):
        def format(self, record):
            return f'[{time.monotonic() - start:6.1f}s] {super().format(record)}'

    _logger.setLevel(logging.INFO)
    _logger.propagate = False
    for handler in _logger.handlers[:]:  # of an earlier check in this process
        _logger.removeHandler(handler)
        handler.close()
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(out / 'gpu_check.log')):
        handler.setFormatter(Elapsed('%(message)s'))
        _logger.addHandler(handler)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='tests/gpu/gpu_check.py', description=__doc__.split('\n\n')[0],
                                     epilog=__doc__.split('\n\n', 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [part.name for part in PARTS]
    parser.add_argument('--parts', nargs='+', choices=names, default=names, help='the parts to run (default: all)')
    parser.add_argument('--cpu-smoke', action='store_true',
                        help='run the parts on the CPU with a tiny model, to check the check without a GPU')
    parser.add_argument('--dry-run', action='store_true', help='print the commands of a GPU run and stop')
    parser.add_argument('--out', default=None, metavar='DIR',
                        help='output folder (default: logs/gpu_check_YYYY-MM-DD, with _2, _3 ... when it exists; '
                             'a temporary folder with --cpu-smoke)')
    parser.add_argument('--time-limit', type=float, default=570, metavar='SECONDS',
                        help='for the whole check: a part still running then is stopped (default: 570)')
    return parser.parse_args(argv)


def dry_run(profile: Profile):
    out, work = Path('OUT'), Path('WORK')
    train = train_commands(profile, work / 'data', work / 'output', out / 'train_run')
    print('# commands of a GPU run (OUT: the output folder, WORK: a temporary folder)')
    for argv in benchmark_commands(profile, out):
        print(shlex.join(argv))
    for name in ('test_gpu_compile.py', 'test_gpu_gate.py'):
        print(shlex.join([f'GPU_CHECK_DEVICE={profile.device}', *pytest_command(name)]))
    print(shlex.join(ddp_command(profile, out / 'ddp.json')))
    for name in ('train', 'resume', 'validate'):
        print(shlex.join(train[name]))


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.dry_run:
        dry_run(gpu_profile())
        return 0
    if not args.cpu_smoke:
        import torch
        if not torch.cuda.is_available():
            for name in args.parts:
                print(f'{name}: skipped, needs CUDA')
            print('(no GPU here; --cpu-smoke runs the parts on the CPU with a tiny model)')
            return 0
    profile = smoke_profile() if args.cpu_smoke else gpu_profile()
    out = output_folder(args.out, args.cpu_smoke)
    setup_logging(out)
    started = datetime.datetime.now().astimezone().isoformat(timespec='minutes')
    _logger.info(f'GPU check{" (CPU smoke run)" if args.cpu_smoke else ""}: parts {", ".join(args.parts)}; '
                 f'output in {out}')
    start = time.monotonic()
    if not args.cpu_smoke:
        save_nvidia_smi(out / 'nvidia-smi.txt')
    with tempfile.TemporaryDirectory(prefix='gpu_check_work_', ignore_cleanup_errors=True) as work:
        check = Check(profile, out, Path(work), args.time_limit)
        results = run_parts(check, args.parts)
    write_summary(check, results, argv, started, time.monotonic() - start, args.parts)
    for result in results.values():
        print(f'{result.name}: {result.status} ({result.seconds:.0f} s)'
              + (f': {result.details[0]}' if result.status != 'pass' and result.details else ''))
    print(f'summary: {out / "summary.md"}')
    failed = len(results) < len(args.parts) or any(r.status != 'pass' for r in results.values())
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
