#!/usr/bin/env python3
"""Inference and training throughput of timm models, PosMLP's included, on CPU or CUDA.

Every --model entry is benchmarked for inference (a forward pass under inference_mode) and/or
training (forward, cross entropy on random targets, backward, optimizer step, in train mode).
Entries run interleaved: each round times every (entry, mode) once, in an order rotated from round
to round, so background load on a busy machine falls on all of them alike; the median over rounds
is reported with the min and max. By default each (entry, mode) lives in its own worker process,
which makes its peak memory its own and comparable between entries.

Example, PosMLP-T's fast gate against its reference form and gMLP-S, plus bfloat16 autocast:
    python3 benchmark.py --model posmlp_t posmlp_t:gate_impl=reference gmlp_s16_224 \\
        posmlp_t@bfloat16 --batch-size 16 --results-file results.csv
"""
import argparse
import ast
import contextlib
import csv
import dataclasses
import datetime
import difflib
import importlib
import json
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import timm
from timm.data import resolve_model_data_config
from timm.utils import ParseKwargs, reparameterize_model
from torch.utils.flop_counter import FlopCounterMode

import models  # noqa: F401  (registers PosMLP with timm)
from utils.amp import DEFAULT_AMP_DTYPE

MODES = ('infer', 'train')
DTYPE_NAMES = {
    'float32': 'float32', 'fp32': 'float32',
    'bfloat16': 'bfloat16', 'bf16': 'bfloat16',
    'float16': 'float16', 'fp16': 'float16', 'half': 'float16',
}
RESULT_FORMATS = ('.csv', '.json')
TABLE_COLUMNS = (
    ('model', 'model'), ('setting', 'setting'), ('mode', 'mode'), ('batch', 'batch_size'),
    ('img', 'img_size'), ('dtype', 'dtype'), ('img/s', 'img_per_sec'), ('img/s min-max', None),
    ('vs base', 'speed_vs_baseline'), ('ms/step', 'ms_per_step'), ('CPU ms/step', 'cpu_ms_per_step'),
    ('params M', 'params_m'), ('GMACs', 'gmacs'), ('peak MB', 'peak_mem_mb'),
)

SPEC_HELP = """\
model entries (--model):
  NAME[:KEY=VALUE[,KEY=VALUE...]][@DTYPE]
    NAME      a timm model name (PosMLP's are registered: posmlp_t, posmlp_t_lrpe, ...)
    KEY=VALUE model keyword arguments for this entry only, over --model-kwargs; values are
              Python literals where they parse as one (2, 0.1, True, (8,16)), strings otherwise;
              commas inside brackets or quotes belong to the value
    @DTYPE    autocast dtype for this entry (bfloat16, float16, or float32 for none), over --amp
  Quote entries that hold brackets in the shell. The same model may appear with several settings:
    --model posmlp_t posmlp_t:gate_impl=reference posmlp_t@bfloat16 gmlp_s16_224

columns: img/s is the median over rounds of batch x steps / round time (min-max beside it);
vs base (with --baseline) the median over rounds of img/s over the baseline's in that round;
ms/step the median round time per step; CPU ms/step the median CPU time of the process (all its
threads) per step, which other programs' load inflates less than wall-clock time (on CUDA it is
host time only); GMACs the multiply-accumulates of one inference forward per image (torch's
FlopCounterMode: matmuls and convolutions, MACs = FLOPs / 2);
peak MB the peak memory of the measured steps above the process's level just before the model
was built (weights, inputs, activations, gradients, optimizer state): CUDA's peak allocated
memory, or on CPU the peak resident set size (/proc/self/status VmHWM, reset after warm-up),
which also counts the library code the model's kernels first touch (some tens of MB).
"""


class BenchmarkError(Exception):
    """A failure to report as one line naming the entry, the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One --model entry: the model, its own keyword arguments and optional autocast dtype."""
    text: str
    model: str
    kwargs: Tuple[Tuple[str, object], ...]
    kwargs_text: str
    dtype: Optional[str]

    @property
    def setting(self) -> str:
        return self.kwargs_text or 'default'


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Settings shared by every entry; picklable, as worker processes receive it."""
    device: str
    batch_size: int
    img_size: Optional[int]
    model_kwargs: Tuple[Tuple[str, object], ...]
    amp_dtype: Optional[str]
    channels_last: bool
    torchcompile: Optional[str]
    opt: str
    lr: float
    warmup: int
    steps: int
    threads: Optional[int]
    imports: Tuple[str, ...] = ()
    reparam: bool = False


@dataclasses.dataclass(frozen=True)
class Task:
    spec: ModelSpec
    mode: str

    @property
    def label(self) -> str:
        return f'{self.spec.text} ({self.mode})'


def split_top_level(text: str, separator: str) -> List[str]:
    """Split on `separator` where it is outside brackets and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in '\'"':
            quote = char
        elif char in '([{':
            depth += 1
        elif char in ')]}':
            depth -= 1
        elif char == separator and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_value(text: str):
    """A Python literal where the text is one, else the text itself, as timm's ParseKwargs does."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_model_spec(text: str) -> ModelSpec:
    """Parse `NAME[:KEY=VALUE,...][@DTYPE]`; raises ValueError naming the problem and the fix."""
    body, dtype = text, None
    head, at, tail = text.rpartition('@')
    if at:
        if tail.lower() not in DTYPE_NAMES:
            raise ValueError(f'{text!r}: unknown dtype {tail!r} after "@"; use one of bfloat16, float16, float32.')
        body, dtype = head, DTYPE_NAMES[tail.lower()]
    name, colon, kwargs_text = body.partition(':')
    if not name:
        raise ValueError(f'{text!r}: no model name; write NAME[:KEY=VALUE,...][@DTYPE], '
                         f'e.g. posmlp_t:gate_impl=reference.')
    if colon and not kwargs_text:
        raise ValueError(f'{text!r}: nothing after ":"; give KEY=VALUE pairs or drop the ":".')
    kwargs = {}
    if kwargs_text:
        for item in split_top_level(kwargs_text, ','):
            key, equals, value = item.partition('=')
            key = key.strip()
            if not equals or not key.isidentifier():
                raise ValueError(f'{text!r}: {item!r} is not KEY=VALUE; separate pairs with commas, '
                                 f'e.g. {name}:gate_impl=reference,drop_rate=0.1.')
            if key in kwargs:
                raise ValueError(f'{text!r}: {key!r} is given twice.')
            kwargs[key] = parse_value(value.strip())
    return ModelSpec(text, name, tuple(kwargs.items()), kwargs_text, dtype)


def import_modules(names: Tuple[str, ...]):
    """Imports the --import modules, whose models register with timm as they load."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ValueError(f'--import {name}: {error}; put the folder that holds it on PYTHONPATH') from None


def check_model_name(name: str):
    if not timm.is_model(name):
        arch = name.split('.')[0]
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f'did you mean {", ".join(close)}? ' if close else ''
        raise ValueError(f'unknown model {name!r}; {hint}list names with '
                         f'python3 -c "import models, timm; print(timm.list_models(\'*mlp*\'))"')


def proc_status_kb(field: str) -> Optional[int]:
    """A memory figure of this process from /proc/self/status (Linux), in kB."""
    try:
        with open('/proc/self/status') as status:
            for line in status:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class CpuMemory:
    """Peak resident memory of the measured steps above the level before the model was built."""

    def __init__(self):
        self.baseline_kb = proc_status_kb('VmRSS')

    def reset_peak(self):
        # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0). Where that is refused, VmHWM spans the
        # whole process: build and warm-up too, which in a one-model worker is still that model's peak.
        with contextlib.suppress(OSError):
            with open('/proc/self/clear_refs', 'w') as clear_refs:
                clear_refs.write('5')

    def peak_mb(self) -> Optional[float]:
        peak_kb = proc_status_kb('VmHWM')
        if peak_kb is None or self.baseline_kb is None:
            return None
        return (peak_kb - self.baseline_kb) / 1024


class CudaMemory:
    """Peak allocated CUDA memory of the measured steps above the level before the model was built."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = torch.cuda.memory_allocated(device)

    def reset_peak(self):
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mb(self) -> float:
        return (torch.cuda.max_memory_allocated(self.device) - self.baseline) / 2 ** 20


def benchmark_input_size(model: torch.nn.Module, model_kwargs: Dict[str, object],
                         img_size: Optional[int]) -> Tuple[int, int, int]:
    """(C, H, W) of the inputs: --img-size, else the entry's img_size and in_chans model arguments, else
    the model's data config (which does not follow the arguments it was built with)."""
    channels, height, width = resolve_model_data_config(model)['input_size']
    channels = model_kwargs.get('in_chans', channels)
    side = img_size or model_kwargs.get('img_size')
    if side is not None:
        height, width = (side, side) if isinstance(side, int) else side
    return channels, height, width


def count_gmacs(model: torch.nn.Module, input_shape: Tuple[int, ...], device: torch.device,
                memory_format: torch.memory_format) -> float:
    """Multiply-accumulates of one inference forward of one image, in billions."""
    x = torch.randn(1, *input_shape, device=device).contiguous(memory_format=memory_format)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


class ModelBench:
    """One entry in one mode: the model, its inputs and a step function, timed round by round."""

    def __init__(self, task: Task, config: RunConfig):
        import_modules(config.imports)  # a spawned worker has not imported them yet
        self.config = config
        self.device = torch.device(config.device)
        self.steps = config.steps
        torch.manual_seed(0)
        if config.threads:
            torch.set_num_threads(config.threads)
        if self.device.type == 'cuda':
            torch.backends.cudnn.benchmark = True
        self.memory = CudaMemory(self.device) if self.device.type == 'cuda' else CpuMemory()
        self.peak_reset = False

        kwargs = dict(config.model_kwargs, **dict(task.spec.kwargs))
        try:
            model = timm.create_model(task.spec.model, pretrained=False, **kwargs)
        except TypeError as error:
            raise BenchmarkError(f'{describe_error(error)} (check the keyword names in --model-kwargs and in '
                                 f'the entry against the model\'s constructor)') from error
        if config.reparam and task.mode == 'infer':
            model = reparameterize_model(model.eval())
        self.params_m = sum(p.numel() for p in model.parameters()) / 1e6
        self.input_size = input_size = benchmark_input_size(model, kwargs, config.img_size)
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        model.to(device=self.device, memory_format=memory_format)
        try:
            self.gmacs = count_gmacs(model, input_size, self.device, memory_format)
        except Exception as error:
            if config.img_size and 'img_size' not in kwargs:
                raise BenchmarkError(f'{describe_error(error)} (with --img-size {config.img_size}: a model with a '
                                     f'fixed input size needs img_size={config.img_size} in --model-kwargs or in '
                                     f'its entry)') from error
            raise

        self.dtype = task.spec.dtype or config.amp_dtype or 'float32'
        self.autocast = (torch.autocast(self.device.type, dtype=getattr(torch, self.dtype))
                         if self.dtype != 'float32' else contextlib.nullcontext())
        self.inputs = torch.randn(config.batch_size, *input_size, device=self.device).contiguous(
            memory_format=memory_format)
        model.train(task.mode == 'train')
        if task.mode == 'train':
            self._setup_training(model)
        self.run_model = torch.compile(model, backend=config.torchcompile) if config.torchcompile else model
        self.step = self._train_step if task.mode == 'train' else self._infer_step
        for _ in range(config.warmup):
            self.step()
        self._synchronize()

    def _setup_training(self, model: torch.nn.Module):
        num_classes = getattr(model, 'num_classes', 0)
        if not num_classes:
            raise ValueError('training needs a classifier head (num_classes > 0); drop num_classes=0 '
                             'or benchmark this entry with --bench infer')
        self.targets = torch.randint(0, num_classes, (self.config.batch_size,), device=self.device)
        if self.config.opt == 'sgd':
            self.optimizer = torch.optim.SGD(model.parameters(), lr=self.config.lr, momentum=0.9)
        else:
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.config.lr)
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == 'float16' else None

    def _infer_step(self):
        with torch.inference_mode(), self.autocast:
            self.run_model(self.inputs)

    def _train_step(self):
        with self.autocast:
            loss = F.cross_entropy(self.run_model(self.inputs), self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def _synchronize(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def describe(self) -> Dict[str, object]:
        height, width = self.input_size[1:]
        img_size = height if height == width else f'{height}x{width}'
        return dict(params_m=self.params_m, gmacs=self.gmacs, img_size=img_size, dtype=self.dtype)

    def measure_round(self) -> Tuple[float, float]:
        """Wall-clock and process CPU seconds for `steps` steps."""
        if not self.peak_reset:
            self.memory.reset_peak()
            self.peak_reset = True
        self._synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(self.steps):
            self.step()
        self._synchronize()
        return time.perf_counter() - start, time.process_time() - cpu_start

    def peak_mem_mb(self) -> Optional[float]:
        return self.memory.peak_mb()


def describe_error(error: BaseException) -> str:
    return str(error) if isinstance(error, BenchmarkError) else f'{type(error).__name__}: {error}'


class InProcessRunner:
    """Runs a task in this process: quick to start, but its memory mixes with every other task's."""

    def __init__(self, task: Task, config: RunConfig):
        self.task, self.config = task, config
        self.bench: Optional[ModelBench] = None

    def _call(self, method):
        try:
            return method()
        except Exception as error:
            raise BenchmarkError(f'{self.task.label}: {describe_error(error)}') from error

    def prepare(self) -> Dict[str, object]:
        self.bench = self._call(lambda: ModelBench(self.task, self.config))
        return self.bench.describe()

    def measure_round(self) -> Tuple[float, float]:
        return self._call(self.bench.measure_round)

    def finish(self) -> Optional[float]:
        peak, self.bench = self.bench.peak_mem_mb(), None
        return peak

    def close(self):
        self.bench = None


def worker_main(connection, task: Task, config: RunConfig):
    """A worker process's loop: answers 'prepare', 'round' and 'finish' from the parent in turn."""
    parent_pid = os.getppid()
    bench = None
    try:
        while True:
            # Workers forked later hold copies of the parent's end of this pipe, so the pipe stays
            # open when the parent dies; a changed parent pid tells that it is gone.
            if not connection.poll(1.0):
                if os.getppid() != parent_pid:
                    return
                continue
            command = connection.recv()
            if command == 'prepare':
                bench = ModelBench(task, config)
                connection.send(('ok', bench.describe()))
            elif command == 'round':
                connection.send(('ok', bench.measure_round()))
            else:
                connection.send(('ok', bench.peak_mem_mb()))
                return
    except (EOFError, KeyboardInterrupt):
        return  # the parent is gone or interrupted: nothing to report to
    except Exception as error:
        connection.send(('error', describe_error(error)))


class WorkerRunner:
    """Runs a task in a worker process of its own, so its peak memory is its own."""

    def __init__(self, task: Task, config: RunConfig, context):
        self.task = task
        self.connection, child_connection = context.Pipe()
        self.process = context.Process(target=worker_main, args=(child_connection, task, config), daemon=True)
        self.process.start()
        child_connection.close()

    def _ask(self, command: str):
        self.connection.send(command)
        try:
            status, payload = self.connection.recv()
        except EOFError:
            self.process.join(timeout=10)
            code = self.process.exitcode
            cause = 'killed, most likely for lack of memory: try a smaller --batch-size' if code == -9 else (
                'see the messages above; --no-isolate runs it in this process with a full traceback')
            raise BenchmarkError(f'{self.task.label}: the worker process died (exit code {code}); {cause}') from None
        if status == 'error':
            raise BenchmarkError(f'{self.task.label}: {payload}')
        return payload

    def prepare(self) -> Dict[str, object]:
        return self._ask('prepare')

    def measure_round(self) -> Tuple[float, float]:
        return self._ask('round')

    def finish(self) -> Optional[float]:
        peak = self._ask('finish')
        self.process.join(timeout=30)
        return peak

    def close(self):
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=10)
        self.connection.close()


def worker_context(device: torch.device):
    """How to start workers. On CPU they fork from this process, which has imported torch but run
    no op, so they start at once. A child forked after its parent touched CUDA (is_available does)
    cannot use CUDA, so for CUDA they fork from a server that has only imported this file; spawn
    where neither is available."""
    methods = multiprocessing.get_all_start_methods()
    if device.type == 'cpu' and 'fork' in methods:
        return multiprocessing.get_context('fork')
    if 'forkserver' in methods:
        context = multiprocessing.get_context('forkserver')
        context.set_forkserver_preload(['__main__'])
        return context
    return multiprocessing.get_context('spawn')


START_TIME = time.monotonic()


def log(message: str):
    print(f'[{time.monotonic() - START_TIME:6.1f}s] {message}', file=sys.stderr, flush=True)


def run_tasks(tasks: List[Task], config: RunConfig, isolate: bool, repeats: int) -> List[Dict[str, object]]:
    """Prepare every task, time `repeats` interleaved rounds, and return one result row per task."""
    context = worker_context(torch.device(config.device)) if isolate else None
    runners = [WorkerRunner(t, config, context) if isolate else InProcessRunner(t, config) for t in tasks]
    try:
        infos = []
        for task, runner in zip(tasks, runners):
            info = runner.prepare()
            log(f'ready  {task.label}: {info["params_m"]:.2f} M params, {info["gmacs"]:.4g} GMACs, '
                f'{info["img_size"]} px, {info["dtype"]}')
            infos.append(info)
        timings = [[] for _ in tasks]
        for round_index in range(repeats):
            shift = round_index % len(tasks)
            for i in list(range(shift, len(tasks))) + list(range(shift)):
                wall, cpu = runners[i].measure_round()
                timings[i].append((wall, cpu))
                log(f'round {round_index + 1}/{repeats}  {tasks[i].label}: '
                    f'{config.batch_size * config.steps / wall:.2f} img/s, {cpu / wall:.2f} CPUs busy')
        peaks = [runner.finish() for runner in runners]
    finally:
        for runner in runners:
            runner.close()
    # In one shared process a task's memory figure would include every other task's.
    memory_is_own = isolate or len(tasks) == 1
    return [result_row(task, info, times, peak if memory_is_own else None, config)
            for task, info, times, peak in zip(tasks, infos, timings, peaks)]


def result_row(task: Task, info: Dict[str, object], timings: List[Tuple[float, float]],
               peak_mem_mb: Optional[float], config: RunConfig) -> Dict[str, object]:
    seconds = [wall for wall, _ in timings]
    cpu_seconds = [cpu for _, cpu in timings]
    images = config.batch_size * config.steps
    rates = sorted(images / s for s in seconds)
    model_kwargs = dict(config.model_kwargs, **dict(task.spec.kwargs))
    return dict(
        model=task.spec.model,
        setting=task.spec.setting,
        mode=task.mode,
        batch_size=config.batch_size,
        img_size=info['img_size'],
        dtype=info['dtype'],
        img_per_sec=round(statistics.median(rates), 3),
        img_per_sec_min=round(rates[0], 3),
        img_per_sec_max=round(rates[-1], 3),
        speed_vs_baseline=None,
        ms_per_step=round(statistics.median(seconds) / config.steps * 1000, 2),
        cpu_ms_per_step=round(statistics.median(cpu_seconds) / config.steps * 1000, 2),
        params_m=round(info['params_m'], 3),
        gmacs=float(f'{info["gmacs"]:.4g}'),
        peak_mem_mb=None if peak_mem_mb is None else round(peak_mem_mb, 1),
        device=config.device,
        channels_last=config.channels_last,
        torchcompile=config.torchcompile or '',
        optimizer=config.opt if task.mode == 'train' else '',
        rounds=len(seconds),
        steps_per_round=config.steps,
        round_img_per_sec=[images / s for s in seconds],  # rounded when written
        model_kwargs=model_kwargs,
    )


def add_speed_vs_baseline(rows: List[Dict[str, object]], tasks: List[Task], baseline: ModelSpec):
    """Each row's img/s over the baseline entry's in the same mode, as the median of per-round ratios:
    rounds are interleaved, so both ran minutes apart at most and shared that time's background load."""
    base_rates = {task.mode: row['round_img_per_sec'] for task, row in zip(tasks, rows) if task.spec == baseline}
    for task, row in zip(tasks, rows):
        ratios = [rate / base for rate, base in zip(row['round_img_per_sec'], base_rates[task.mode])]
        row['speed_vs_baseline'] = statistics.median(ratios)  # rounded when written


def format_cell(key: Optional[str], row: Dict[str, object]) -> str:
    if key is None:
        return f'{row["img_per_sec_min"]:.2f}-{row["img_per_sec_max"]:.2f}'
    value = row[key]
    if value is None:
        return '-'
    if key == 'speed_vs_baseline':
        return f'{value:.2f}x'
    if key in ('img_per_sec', 'ms_per_step', 'cpu_ms_per_step', 'params_m'):
        return f'{value:.2f}'
    if key == 'gmacs':
        return f'{value:.4g}'
    if key == 'peak_mem_mb':
        return f'{value:.0f}'
    return str(value)


def format_table(rows: List[Dict[str, object]]) -> str:
    columns = [(title, key) for title, key in TABLE_COLUMNS
               if key != 'speed_vs_baseline' or rows[0]['speed_vs_baseline'] is not None]
    cells = [[title for title, _ in columns]]
    cells += [[format_cell(key, row) for _, key in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return '\n'.join('  '.join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells)


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as cpuinfo:
            for line in cpuinfo:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()


# Environment variables that change speed without showing in the command: allocators, thread pools, math
# modes, compilers, devices, and where imported code comes from.
TIMING_ENV_PREFIXES = (
    'MALLOC_', 'LD_PRELOAD', 'OMP_', 'MKL_', 'KMP_', 'PYTORCH_', 'TORCH', 'NVIDIA_TF32_OVERRIDE', 'CUBLAS_',
    'CUDNN_', 'CUDA_', 'NCCL_', 'PYTHONPATH',
)


def environment(argv: List[str], args: argparse.Namespace, device: torch.device) -> Dict[str, object]:
    """What a results file needs for a reader to know how and where it was measured."""
    return dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        command='python3 benchmark.py ' + shlex.join(argv),
        device_name=device_name(device),
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        torch_threads=args.threads or torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
        timm=timm.__version__,
        warmup=args.warmup,
        lr=args.lr,
        baseline=args.baseline or '',
        env_vars={k: v for k, v in sorted(os.environ.items()) if k.startswith(TIMING_ENV_PREFIXES)},
    )


def write_results(path: Path, rows: List[Dict[str, object]], env: Dict[str, object]):
    """JSON: the environment once, then the rows. CSV: one line per row, the environment in every line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [dict(row, round_img_per_sec=[round(rate, 3) for rate in row['round_img_per_sec']],
                 speed_vs_baseline=None if row['speed_vs_baseline'] is None else round(row['speed_vs_baseline'], 3))
            for row in rows]
    if path.suffix == '.json':
        path.write_text(json.dumps(dict(environment=env, results=rows), indent=2, default=repr) + '\n')
        return
    with path.open('w', newline='') as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]) + list(env))
        writer.writeheader()
        env_cells = dict(env, env_vars=json.dumps(env['env_vars']))
        for row in rows:
            writer.writerow(dict(row, **env_cells, round_img_per_sec=' '.join(map(str, row['round_img_per_sec'])),
                                 model_kwargs=json.dumps(row['model_kwargs'], default=repr)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Benchmark inference and training of timm models (PosMLP included) on CPU or CUDA: '
                    'img/s, ms per step, parameters, GMACs and peak memory, entries interleaved round by round.',
        epilog=SPEC_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', nargs='+', required=True, metavar='ENTRY',
                        help='models to benchmark, NAME[:KEY=VALUE,...][@DTYPE] each (see below)')
    parser.add_argument('--import', dest='imports', nargs='+', default=[], metavar='MODULE',
                        help='import these Python modules first, so that --model can name the models they '
                             'register with timm (another implementation to compare against, say)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                        help='keyword arguments for every model; an entry\'s own KEY=VALUE wins')
    parser.add_argument('--bench', choices=('infer', 'train', 'both'), default='both',
                        help='what to time (default: both)')
    parser.add_argument('-b', '--batch-size', type=int, default=32, help='images per step (default: 32)')
    parser.add_argument('--img-size', type=int, default=None,
                        help='square input side (default: each model\'s own input size)')
    parser.add_argument('--device', default=None, help='cpu, cuda or cuda:N (default: cuda if available, else cpu)')
    parser.add_argument('--amp', action='store_true', help='run under torch.autocast')
    parser.add_argument('--amp-dtype', choices=('bfloat16', 'float16'), default=None,
                        help='autocast dtype; implies --amp (default: bfloat16 on CPU, float16 on CUDA); '
                             'float16 training scales the loss with a GradScaler')
    parser.add_argument('--channels-last', action='store_true', help='model and input in channels-last layout')
    parser.add_argument('--torchcompile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                        help='torch.compile every model, with BACKEND (default when given: inductor); '
                             'compiling happens in the first steps, so give enough --warmup')
    parser.add_argument('--reparam', action='store_true',
                        help='time inference of each model in its fused form (timm\'s reparameterize_model)')
    parser.add_argument('--opt', choices=('sgd', 'adamw'), default='sgd',
                        help='training optimizer (default: sgd with momentum 0.9)')
    parser.add_argument('--lr', type=float, default=1e-4, help='training learning rate (default: 1e-4)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps before the first round (default: 2)')
    parser.add_argument('--repeats', type=int, default=5,
                        help='timed rounds per entry and mode; the median is reported (default: 5)')
    parser.add_argument('--steps', type=int, default=3, help='steps in each timed round (default: 3)')
    parser.add_argument('--threads', type=int, default=None,
                        help='CPU threads for torch in each benchmark (default: torch\'s own choice)')
    parser.add_argument('--isolate', action=argparse.BooleanOptionalAction, default=True,
                        help='run each entry and mode in its own worker process (default), which keeps peak '
                             'memory per model comparable; --no-isolate runs all in this process, where '
                             'peak memory is only reported for a single entry and mode')
    parser.add_argument('--baseline', default=None, metavar='ENTRY',
                        help='one of the --model entries as written; adds each row\'s speed relative to it, '
                             'the median over rounds of the ratio of their img/s in the same round')
    parser.add_argument('--results-file', type=Path, default=None,
                        help='also write the results to this .csv or .json file')
    return parser


def resolve_device(requested: Optional[str], parser: argparse.ArgumentParser) -> torch.device:
    if requested is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(requested)
    except RuntimeError:
        parser.error(f'--device {requested!r} is not a device; use cpu, cuda or cuda:N')
    if device.type not in ('cpu', 'cuda'):
        parser.error(f'--device {requested!r}: only cpu and cuda are supported')
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error(f'--device {requested!r}: CUDA is not available here; use --device cpu')
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f'--device {requested!r}: there are {torch.cuda.device_count()} CUDA devices')
    return device


def parse_args(argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, List[ModelSpec], RunConfig]:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ('batch_size', 'steps', 'repeats'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be at least 1')
    if args.warmup < 0:
        parser.error('--warmup must be 0 or more')
    if args.threads is not None and args.threads < 1:
        parser.error('--threads must be at least 1')
    if args.img_size is not None and args.img_size < 1:
        parser.error('--img-size must be a positive number of pixels')
    if args.results_file is not None and args.results_file.suffix not in RESULT_FORMATS:
        parser.error(f'--results-file {args.results_file}: name it .csv or .json')
    if 'pretrained' in args.model_kwargs:
        parser.error('--model-kwargs pretrained: weights are never downloaded; benchmarking needs none')
    try:
        import_modules(tuple(args.imports))
    except ValueError as error:
        parser.error(str(error))
    specs = []
    for text in args.model:
        try:
            spec = parse_model_spec(text)
            check_model_name(spec.model)
        except ValueError as error:
            parser.error(f'--model: {error}')
        if any(key == 'pretrained' for key, _ in spec.kwargs):
            parser.error(f'--model {text!r}: weights are never downloaded; drop pretrained')
        if spec in specs:
            parser.error(f'--model {text!r} is listed twice')
        specs.append(spec)
    if args.baseline is not None and args.baseline not in args.model:
        parser.error(f'--baseline {args.baseline!r} is not one of the --model entries; copy one as written')
    device = resolve_device(args.device, parser)
    amp_dtype = args.amp_dtype or (DEFAULT_AMP_DTYPE[device.type] if args.amp else None)
    config = RunConfig(
        device=str(device), batch_size=args.batch_size, img_size=args.img_size,
        model_kwargs=tuple(args.model_kwargs.items()), amp_dtype=amp_dtype, channels_last=args.channels_last,
        torchcompile=args.torchcompile, opt=args.opt, lr=args.lr, warmup=args.warmup, steps=args.steps,
        threads=args.threads, imports=tuple(args.imports), reparam=args.reparam,
    )
    return args, specs, config


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, specs, config = parse_args(argv)
    modes = MODES if args.bench == 'both' else (args.bench,)
    tasks = [Task(spec, mode) for spec in specs for mode in modes]
    device = torch.device(config.device)
    env = environment(argv, args, device)
    log(f'{len(tasks)} benchmarks on {device} ({env["device_name"]}), '
        f'{"one worker process each" if args.isolate else "all in this process"}')
    try:
        rows = run_tasks(tasks, config, args.isolate, args.repeats)
        if args.baseline is not None:
            add_speed_vs_baseline(rows, tasks, specs[args.model.index(args.baseline)])
    except BenchmarkError as error:
        print(f'benchmark.py: error: {error}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('benchmark.py: interrupted', file=sys.stderr)
        return 130
    threads = env['torch_threads']
    print(f'# {env["device_name"]} ({device}, {threads} thread{"s" if threads != 1 else ""}), '
          f'torch {env["torch"]}, timm {env["timm"]}; img/s median (min-max) of {args.repeats} rounds '
          f'x {config.steps} steps after {config.warmup} warm-up steps')
    print(format_table(rows))
    if not (args.isolate or len(tasks) == 1):
        print('# peak MB: not reported when several benchmarks share one process; run without --no-isolate')
    if args.results_file is not None:
        write_results(args.results_file, rows, env)
        log(f'results written to {args.results_file}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
