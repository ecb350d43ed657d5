"""Timing models: inference and training steps in rounds, each model in a worker process of its own.

An entry is a timm model name, optionally with keyword arguments for that model alone; an entry in
one mode (inference or training) is a task. `time_tasks` times `repeats` rounds of `steps` steps per
task; interleaved (the default), it builds every task first and times each once per round in an order
rotated from round to round, so background load on a shared machine falls on all tasks alike, which
holds every model in memory at once; one at a time, it builds, times and closes each task in turn. A
task's row reports the median over rounds with the min and max. In a worker process of its own, a
task's peak memory is its own.
"""
import argparse
import concurrent.futures
import contextlib
import dataclasses
import importlib
import multiprocessing
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple, Union

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from timm.optim import create_optimizer_v2
from timm.utils import ParseKwargs, reparameterize_model
from torch.utils.flop_counter import FlopCounterMode

import models  # noqa: F401  (registers this project's models with timm, in worker processes too)
from .amp import resolve_precision
from .errors import BenchmarkError

MODES = ('infer', 'train')
TABLE_COLUMNS = (
    ('model', 'model'), ('setting', 'setting'), ('mode', 'mode'), ('batch', 'batch_size'),
    ('img', 'img_size'), ('dtype', 'dtype'), ('img/s', 'img_per_sec'), ('img/s min-max', 'img_per_sec_range'),
    ('vs base', 'speed_vs_baseline'), ('ms/step', 'ms_per_step'), ('CPU ms/step', 'cpu_ms_per_step'),
    ('params M', 'params_m'), ('GMACs', 'gmacs'), ('peak MB', 'peak_mem_mb'),
)


@dataclasses.dataclass(frozen=True)
class Entry:
    """A model to time: its timm name and its own keyword arguments (`words`, as KEY=VALUE), over --model-kwargs."""
    model: str
    words: Tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return ' '.join((self.model, *self.words))

    @property
    def setting(self) -> str:
        return ' '.join(self.words) or 'default'

    @property
    def kwargs(self) -> Dict[str, object]:
        namespace = argparse.Namespace()
        ParseKwargs(option_strings=[], dest='kwargs')(None, namespace, self.words)
        return namespace.kwargs


def parse_entry(text: str) -> Entry:
    """`NAME [KEY=VALUE ...]`: a model name, then keyword arguments written as --model-kwargs takes them."""
    words = text.split()
    if not words:
        raise ValueError('an empty entry; give a model name')
    name, *pairs = words
    for pair in pairs:
        key, equals, _ = pair.partition('=')
        if not equals or not key.isidentifier():
            raise ValueError(f'{text!r}: {pair!r} is not KEY=VALUE; an entry is a model name and then '
                             f'KEY=VALUE words without spaces, e.g. "posmlp_t gate_impl=reference"')
    keys = [pair.partition('=')[0] for pair in pairs]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise ValueError(f'{text!r}: {", ".join(twice)} given twice')
    return Entry(name, tuple(pairs))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Settings shared by every task; picklable, as worker processes receive it."""
    device: str
    batch_size: int = 32
    img_size: Optional[int] = None
    model_kwargs: Tuple[Tuple[str, object], ...] = ()
    amp_dtype: Optional[str] = None  # None: float32, no autocast
    channels_last: bool = False
    torchcompile: Optional[str] = None
    torchcompile_mode: Optional[str] = None
    reparam: bool = False
    opt: str = 'momentum'
    lr: float = 1e-4
    warmup: int = 2
    steps: int = 3
    threads: Optional[int] = None
    imports: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Task:
    entry: Entry
    mode: str

    @property
    def label(self) -> str:
        return f'{self.entry.text} ({self.mode})'


def import_modules(names: Tuple[str, ...]):
    """Imports the --import modules, whose models register with timm as they load."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ValueError(f'--import {name}: {error}; put the folder that holds it on PYTHONPATH') from None


def _proc_status_kb(field: str) -> Optional[int]:
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
        self.baseline_kb = _proc_status_kb('VmRSS')

    def reset_peak(self):
        # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0). Where that is refused, VmHWM spans the
        # whole process: build and warm-up too, which in a one-task worker is still that task's peak.
        with contextlib.suppress(OSError):
            with open('/proc/self/clear_refs', 'w') as clear_refs:
                clear_refs.write('5')

    def peak_mb(self) -> Optional[float]:
        peak_kb = _proc_status_kb('VmHWM')
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
    """Multiply-accumulates of one inference forward of one image, in billions (FLOPs / 2 of matmuls and convs)."""
    x = torch.randn(1, *input_shape, device=device).contiguous(memory_format=memory_format)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


def build_model(task: Task, config: RunConfig) -> Tuple[torch.nn.Module, Dict[str, object]]:
    kwargs = dict(config.model_kwargs, **task.entry.kwargs)
    try:
        return timm.create_model(task.entry.model, pretrained=False, **kwargs), kwargs
    except TypeError as error:
        raise BenchmarkError(f'TypeError: {error} (check the keyword names in --model-kwargs and in the entry '
                             f'against the model\'s constructor)') from error


class ModelBench:
    """One task: its model, inputs and step function, timed round by round."""

    def __init__(self, task: Task, config: RunConfig):
        import_modules(config.imports)  # a worker process has not imported them yet
        torch.manual_seed(0)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = torch.device(config.device)
        if self.device.type == 'cuda':
            torch.backends.cudnn.benchmark = True
        self.steps = config.steps
        self.memory = CudaMemory(self.device) if self.device.type == 'cuda' else CpuMemory()
        self.peak_reset = False

        model, kwargs = build_model(task, config)
        self.params_m = sum(p.numel() for p in model.parameters()) / 1e6
        self.input_size = benchmark_input_size(model, kwargs, config.img_size)
        if task.mode == 'infer' and config.reparam:
            model = reparameterize_model(model.eval(), inplace=True)
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        model.to(device=self.device, memory_format=memory_format)
        try:
            self.gmacs = count_gmacs(model, self.input_size, self.device, memory_format)
        except Exception as error:
            if config.img_size and 'img_size' not in kwargs:
                raise BenchmarkError(f'{type(error).__name__}: {error} (with --img-size {config.img_size}: a model '
                                     f'with a fixed input size needs img_size={config.img_size} in --model-kwargs '
                                     f'or in its entry)') from error
            raise

        self.dtype = config.amp_dtype or 'float32'
        _, _, self.precision = resolve_precision(self.device, amp=config.amp_dtype is not None,
                                                 amp_dtype=config.amp_dtype)
        self.inputs = torch.randn(config.batch_size, *self.input_size, device=self.device).contiguous(
            memory_format=memory_format)
        model.train(task.mode == 'train')
        self.run_model = (torch.compile(model, backend=config.torchcompile, mode=config.torchcompile_mode)
                          if config.torchcompile else model)
        if task.mode == 'train':
            self._setup_training(model, config)
        self.step = self._train_step if task.mode == 'train' else self._infer_step
        for _ in range(config.warmup):
            self.step()
        self._synchronize()

    def _setup_training(self, model: torch.nn.Module, config: RunConfig):
        num_classes = getattr(model, 'num_classes', 0)
        if not num_classes:
            raise BenchmarkError('training needs a classifier head (num_classes > 0); drop num_classes=0 '
                                 'or time this entry with --bench inference')
        self.targets = torch.randint(0, num_classes, (config.batch_size,), device=self.device)
        self.optimizer = create_optimizer_v2(model, config.opt, lr=config.lr)

    def _infer_step(self):
        with torch.inference_mode(), self.precision.autocast():
            self.run_model(self.inputs)

    def _train_step(self):
        with self.precision.autocast():
            loss = F.cross_entropy(self.run_model(self.inputs), self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        if self.precision.loss_scaler is None:
            loss.backward()
            self.optimizer.step()
        else:  # float16: timm's scaler scales the loss, steps and updates its scale
            self.precision.loss_scaler(loss, self.optimizer)

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

    def close(self):
        pass


_worker_bench: Optional[ModelBench] = None  # the one task of a worker process


def _start_worker_bench(task: Task, config: RunConfig) -> Dict[str, object]:
    global _worker_bench
    _worker_bench = ModelBench(task, config)
    return _worker_bench.describe()


def _call_worker_bench(method: str):
    return getattr(_worker_bench, method)()


class WorkerBench:
    """A ModelBench in a worker process of its own, so that its peak memory is its own; same methods."""

    def __init__(self, task: Task, config: RunConfig, context):
        self.executor = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context)
        try:
            self.info = self._run(_start_worker_bench, task, config)
        except BaseException:
            self.close()
            raise

    def _run(self, function: Callable, *args):
        try:
            return self.executor.submit(function, *args).result()
        except concurrent.futures.process.BrokenProcessPool:
            raise BenchmarkError('the worker process died, most likely killed for lack of memory; try '
                                 '--no-interleave (one model at a time) or a smaller --batch-size') from None

    def describe(self) -> Dict[str, object]:
        return self.info

    def measure_round(self) -> Tuple[float, float]:
        return self._run(_call_worker_bench, 'measure_round')

    def peak_mem_mb(self) -> Optional[float]:
        return self._run(_call_worker_bench, 'peak_mem_mb')

    def close(self):
        self.executor.shutdown(cancel_futures=True)


def worker_context():
    """Workers fork from a server process that has imported only this module (and what it imports): it
    has touched no CUDA and runs no threads, so its children can use CUDA and start at once. Spawn where
    there is no fork server."""
    if 'forkserver' not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context('spawn')
    context = multiprocessing.get_context('forkserver')
    context.set_forkserver_preload([__name__])
    return context


@contextlib.contextmanager
def reported_as(task: Task):
    """Any failure of a task becomes one line that names it."""
    try:
        yield
    except BenchmarkError as error:
        raise BenchmarkError(f'{task.label}: {error}') from error
    except Exception as error:
        if isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(error):
            raise BenchmarkError(f'{task.label}: out of memory ({str(error).splitlines()[0] if str(error) else ""}); '
                                 f'try --no-interleave (one model at a time) or a smaller --batch-size') from error
        raise BenchmarkError(f'{task.label}: {type(error).__name__}: {error}') from error


def rotated(count: int, round_index: int) -> List[int]:
    shift = round_index % count
    return list(range(shift, count)) + list(range(shift))


def time_tasks(tasks: List[Task], config: RunConfig, isolate: bool, repeats: int,
               log: Callable[[str], None], interleave: bool = True) -> List[Dict[str, object]]:
    """Time `repeats` rounds of every task and return one result row per task. Interleaved, every task is
    built first and each round times them all; otherwise each task is built, timed and closed in turn, so
    that only one model's memory is held at a time."""
    groups = [tasks] if interleave else [[task] for task in tasks]
    # In one shared process a task's memory figure would include every other task's.
    memory_is_own = isolate or len(tasks) == 1
    rows = []
    for group in groups:
        for task, info, times, peak in time_together(group, config, isolate, repeats, log):
            rows.append(result_row(task, info, times, peak if memory_is_own else None, config))
    return rows


def time_together(tasks: List[Task], config: RunConfig, isolate: bool, repeats: int,
                  log: Callable[[str], None]) -> List[Tuple[Task, Dict[str, object], List[Tuple[float, float]],
                                                            Optional[float]]]:
    """Build the tasks, time them in interleaved rounds, close them; (task, description, timings, peak MB)."""
    context = worker_context() if isolate else None
    benches: List[Union[ModelBench, WorkerBench]] = []
    try:
        for task in tasks:
            with reported_as(task):
                benches.append(WorkerBench(task, config, context) if isolate else ModelBench(task, config))
            info = benches[-1].describe()
            log(f'ready  {task.label}: {info["params_m"]:.2f} M params, {info["gmacs"]:.4g} GMACs, '
                f'{info["img_size"]} px, {info["dtype"]}')
        timings = [[] for _ in tasks]
        for round_index in range(repeats):
            for i in rotated(len(tasks), round_index):
                with reported_as(tasks[i]):
                    wall, cpu = benches[i].measure_round()
                timings[i].append((wall, cpu))
                log(f'round {round_index + 1}/{repeats}  {tasks[i].label}: '
                    f'{config.batch_size * config.steps / wall:.2f} img/s, {cpu / wall:.2f} CPUs busy')
        peaks = []
        for task, bench in zip(tasks, benches):
            with reported_as(task):
                peaks.append(bench.peak_mem_mb())
        return [(task, bench.describe(), times, peak)
                for task, bench, times, peak in zip(tasks, benches, timings, peaks)]
    finally:
        for bench in benches:
            bench.close()


def result_row(task: Task, info: Dict[str, object], timings: List[Tuple[float, float]],
               peak_mem_mb: Optional[float], config: RunConfig) -> Dict[str, object]:
    seconds = [wall for wall, _ in timings]
    cpu_seconds = [cpu for _, cpu in timings]
    images = config.batch_size * config.steps
    rates = sorted(images / s for s in seconds)
    return dict(
        model=task.entry.model,
        setting=task.entry.setting,
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
        channels_last=config.channels_last,
        torchcompile=config.torchcompile or '',
        reparam=config.reparam and task.mode == 'infer',
        optimizer=config.opt if task.mode == 'train' else '',
        rounds=len(seconds),
        steps_per_round=config.steps,
        round_img_per_sec=[images / s for s in seconds],  # rounded for the file by `file_rows`
        model_kwargs=dict(config.model_kwargs, **task.entry.kwargs),
    )


def add_speed_vs_baseline(rows: List[Dict[str, object]], tasks: List[Task], baseline: Entry):
    """Each row's img/s over the baseline entry's in the same mode, as the median of per-round ratios
    (interleaved, both ran minutes apart at most and shared that time's background load)."""
    base_rates = {task.mode: row['round_img_per_sec'] for task, row in zip(tasks, rows) if task.entry == baseline}
    for task, row in zip(tasks, rows):
        ratios = [rate / base for rate, base in zip(row['round_img_per_sec'], base_rates[task.mode])]
        row['speed_vs_baseline'] = statistics.median(ratios)


def file_rows(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """The rows as the results file holds them: the per-round rates and the ratio rounded."""
    return [dict(row, round_img_per_sec=[round(rate, 3) for rate in row['round_img_per_sec']],
                 speed_vs_baseline=None if row['speed_vs_baseline'] is None else round(row['speed_vs_baseline'], 3))
            for row in rows]


def format_cell(key: str, row: Dict[str, object]) -> str:
    if key == 'img_per_sec_range':
        return f'{row["img_per_sec_min"]:.2f}-{row["img_per_sec_max"]:.2f}'
    value = row.get(key)
    if value is None:
        return '-'
    if key.endswith('vs_baseline'):
        return f'{value:.2f}x'
    if key in ('img_per_sec', 'ms_per_step', 'cpu_ms_per_step', 'params_m'):
        return f'{value:.2f}'
    if key == 'gmacs':
        return f'{value:.4g}'
    if key == 'peak_mem_mb':
        return f'{value:.0f}'
    return str(value)


def table_lines(rows: List[Dict[str, object]], extra_columns: Tuple[Tuple[str, str], ...] = ()) -> List[List[str]]:
    """Header and cells of the printed table; the `vs base` column only when there is a baseline."""
    columns = [(title, key) for title, key in TABLE_COLUMNS + extra_columns
               if key != 'speed_vs_baseline' or rows[0]['speed_vs_baseline'] is not None]
    return [[title for title, _ in columns]] + [[format_cell(key, row) for _, key in columns] for row in rows]
