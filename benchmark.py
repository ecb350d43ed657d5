#!/usr/bin/env python3
"""Time timm models (PosMLP's included) on CPU or CUDA: inference and training img/s, or the data loader's.

    python3 benchmark.py --model posmlp_t gmlp_s16_224 --bench both -b 32
    python3 benchmark.py --model posmlp_t "posmlp_t gate_impl=reference" --baseline "posmlp_t gate_impl=reference"
    python3 benchmark.py --suite comparison --amp --results-file comparison.csv
    python3 benchmark.py --bench data -j 8

Models are timed in rounds, each in a worker process of its own, interleaved but for a suite, which times
one model at a time (utils/benchmarking.py);
`--bench data` times the recipe's transforms through DataLoader workers (utils/loader_benchmark.py).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

import utils.offline  # noqa: F401  (first: the hub client reads its switches when timm imports it)
import torch
from timm.optim import list_optimizers

from utils.amp import resolve_amp_dtype
from utils.args import ModelKwargs, add_amp_options, add_torchcompile_options, amp_requested, check_torchcompile
from utils.benchmarking import (
    MODES, Entry, RunConfig, Task, add_speed_vs_baseline, file_rows, import_modules, parse_entry,
    table_lines, time_tasks,
)
from utils.errors import BenchmarkError, DataError
from utils.distributed import default_device, device_problem
from utils.loader_benchmark import loader_table_lines, time_loaders, write_sample_jpegs
from utils.option_checks import at_least, model_name_problem, non_negative
from utils.results import RESULT_FORMATS, command_line, format_table, results_format, run_environment, write_results
from utils.suites import SUITES, add_reference_columns, reference_columns

ROOT = os.path.dirname(os.path.abspath(__file__))
# The CPUs this process may run on (a container or taskset may allow fewer than the machine has).
AVAILABLE_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
BENCH_MODES = {'both': MODES, 'inference': ('infer',), 'infer': ('infer',), 'train': ('train',), 'data': ()}

ENTRY_HELP = """\
entries (--model, --model-list, --baseline): NAME [KEY=VALUE ...]
  a timm model name, then keyword arguments for that model alone, written as --model-kwargs takes them
  (values are Python literals where they parse as one, strings otherwise; no spaces inside a value).
  Quote an entry with settings as one argument; the same model may appear with several settings, and
  entries are interleaved round by round (but for a --suite), so their timings share the machine's
  load alike:
    --model posmlp_t "posmlp_t gate_impl=reference" "posmlp_t embed_dims=(64,128,256,512)"

columns: img/s is the median over rounds of batch x steps / round time (min-max beside it);
vs base (with --baseline or a --suite) the median over rounds of img/s over the baseline's in that
round (one at a time, round i of each task, taken minutes apart); ms/step the median round time per step; CPU ms/step the median CPU time of the process (all
its threads) per step, which other programs' load inflates less than wall-clock time (on CUDA it is
host time only); GMACs the multiply-accumulates of one inference forward per image (torch's
FlopCounterMode: matmuls and convolutions, MACs = FLOPs / 2); peak MB the peak memory of the measured
steps above the process's level before the model was built: CUDA's peak allocated memory, or on CPU
the peak resident set size (/proc/self/status VmHWM, reset after warm-up), which also counts the
library code the model's kernels first touch (some tens of MB).
--bench data: img/s through the recipe's training and evaluation transforms with 1 and with -j loader
workers, and per worker; a round is --steps batches per worker.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='benchmark.py', description=__doc__.split('\n\n')[0], epilog=ENTRY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group('what to time')
    group.add_argument('--model', '-m', nargs='+', default=[], metavar='ENTRY', help='models to time (see below)')
    group.add_argument('--model-list', default=None, metavar='FILE', help='a text file of entries, one a line')
    group.add_argument('--suite', choices=sorted(SUITES), default=None,
                       help='a named set of models with its baseline: comparison is the paper\'s table of MLP-like '
                            'models plus PosMLP-T/S/B against vip_s7, with the table\'s V100 img/s beside them')
    group.add_argument('--bench', choices=tuple(BENCH_MODES), default='both',
                       help='model steps (inference, train or both), or data: the loader\'s transforms')
    group.add_argument('--import', dest='imports', nargs='+', default=[], metavar='MODULE',
                       help='import these modules first, so that entries can name the models they register with '
                            'timm (another implementation to compare against, say)')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ModelKwargs, metavar='KEY=VALUE',
                       help='keyword arguments for every model; an entry\'s own KEY=VALUE wins')
    group.add_argument('--baseline', default=None, metavar='ENTRY',
                       help='one of the entries; adds each row\'s speed relative to it, the median over rounds of '
                            'the ratio of their img/s in the same round')
    group = parser.add_argument_group('how')
    group.add_argument('-b', '--batch-size', type=at_least(1), default=32, help='images per step (default: 32)')
    group.add_argument('--img-size', type=at_least(1), default=None,
                       help='square input side (default: each model\'s own, or the recipe\'s for --bench data)')
    group.add_argument('--device', default=None, help='cpu, cuda or cuda:N (default: cuda if available, else cpu)')
    add_amp_options(group)  # float16 training scales the loss with timm's NativeScaler
    group.add_argument('--channels-last', action='store_true', help='model and input in channels-last layout')
    add_torchcompile_options(group)
    group.add_argument('--reparam', action='store_true',
                       help='time inference of the model after timm.utils.reparameterize_model (fused layers)')
    group.add_argument('--opt', default='momentum',
                       help='timm optimizer of the training steps (default: momentum, SGD with momentum 0.9)')
    group.add_argument('--lr', type=non_negative, default=1e-4, help='training learning rate (default: 1e-4)')
    group.add_argument('--warmup', type=at_least(0), default=2,
                       help='untimed steps before the first round; --torchcompile compiles in them (default: 2)')
    group.add_argument('--repeats', type=at_least(1), default=5, help='timed rounds per task; the median is reported '
                                                              '(default: 5)')
    group.add_argument('--steps', type=at_least(1), default=3, help='steps (--bench data: batches per worker) in each '
                                                            'timed round (default: 3)')
    group.add_argument('--threads', type=at_least(1), default=None, help='CPU threads for torch in each task '
                                                                 '(default: torch\'s own choice)')
    group.add_argument('--isolate', action=argparse.BooleanOptionalAction, default=True,
                       help='each task in its own worker process (default), which keeps peak memory per model '
                            'comparable; --no-isolate runs all in this process, where peak memory is only '
                            'reported for a single task')
    group.add_argument('--interleave', action=argparse.BooleanOptionalAction, default=None,
                       help='build every task first and time them round by round, so that they share the '
                            'machine\'s load alike (default, but for a --suite); --no-interleave times one model '
                            'at a time, holding only its memory: a suite\'s models together outgrow most machines')
    group = parser.add_argument_group('--bench data')
    group.add_argument('--data-dir', default=None, metavar='DIR',
                       help='images to read, one subfolder per class (e.g. /imagenet/train); default: JPEGs '
                            'generated into a temporary folder')
    group.add_argument('--data-images', type=at_least(1), default=256, help='JPEGs to generate (default: 256)')
    group.add_argument('--data-long-side', type=at_least(1), default=500,
                       help='longer side of the generated JPEGs, px (default: 500, as most ImageNet photos)')
    group.add_argument('-j', '--workers', type=at_least(1), default=AVAILABLE_CPUS,
                       help='loader workers to time besides 1 (default: the CPUs this process may use)')
    group.add_argument('--recipe', default=os.path.join(ROOT, 'configs', 'posmlp_t.yaml'), metavar='FILE',
                       help='the training config whose transforms are timed (default: configs/posmlp_t.yaml)')
    group = parser.add_argument_group('output')
    group.add_argument('--results-file', default=None, metavar='PATH', help='also write the rows to this file')
    group.add_argument('--results-format', choices=RESULT_FORMATS, default=None,
                       help='csv or json (default: the --results-file suffix\'s)')
    return parser


def read_model_list(parser: argparse.ArgumentParser, path: str) -> List[str]:
    try:
        with open(path) as file:
            return [line.strip() for line in file if line.strip() and not line.lstrip().startswith('#')]
    except OSError as error:
        parser.error(f'--model-list {path}: {error.strerror}; give a text file of entries, one a line')


def parse_entries(parser: argparse.ArgumentParser, args: argparse.Namespace) -> List[Entry]:
    """The entries of --suite, --model-list and --model, in that order; an error names the option it came from."""
    sources = [(f'--suite {args.suite}', text) for text in (SUITES[args.suite].models if args.suite else ())]
    sources += [(f'--model-list {args.model_list}', text)
                for text in (read_model_list(parser, args.model_list) if args.model_list else ())]
    sources += [('--model', text) for text in args.model]
    if not sources:
        parser.error('name what to time: --model, --model-list or --suite (or --bench data for the loader)')
    entries = []
    for option, text in sources:
        try:
            entry = parse_entry(text)
        except ValueError as error:
            parser.error(f'{option}: {error}')
        problem = model_name_problem(entry.model)
        if problem:
            parser.error(f'{option}: {entry.model}: {problem} List the names with python3 -c "import models, timm; '
                         f'print(timm.list_models(\'*mlp*\'))"')
        if 'pretrained' in entry.kwargs:
            parser.error(f'{option}: {text!r}: weights are never downloaded; drop pretrained')
        if entry in entries:
            parser.error(f'{option}: {entry.text!r} is listed twice')
        entries.append(entry)
    return entries


def parse_baseline(parser: argparse.ArgumentParser, args: argparse.Namespace, entries: List[Entry]) -> Optional[Entry]:
    text = args.baseline or (SUITES[args.suite].baseline if args.suite else None)
    if text is None:
        return None
    try:
        baseline = parse_entry(text)
    except ValueError as error:
        parser.error(f'--baseline: {error}')
    if baseline not in entries:
        parser.error(f'--baseline {text!r} is not one of the entries; copy one as written')
    return baseline


def run_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> RunConfig:
    device = args.device or default_device()
    problem = device_problem(device)
    if problem:
        parser.error(problem)
    if args.opt.lower() not in list_optimizers():
        parser.error(f'--opt {args.opt}: timm has no such optimizer; e.g. sgd, momentum, adamw')
    if 'pretrained' in args.model_kwargs:
        parser.error('--model-kwargs pretrained: weights are never downloaded; benchmarking needs none')
    return RunConfig(
        device=str(torch.device(device)), batch_size=args.batch_size, img_size=args.img_size,
        model_kwargs=tuple(args.model_kwargs.items()),
        amp_dtype=resolve_amp_dtype(torch.device(device), args.amp_dtype) if amp_requested(args) else None,
        channels_last=args.channels_last, torchcompile=args.torchcompile, torchcompile_mode=args.torchcompile_mode,
        reparam=args.reparam, opt=args.opt.lower(), lr=args.lr, warmup=args.warmup, steps=args.steps,
        threads=args.threads, imports=tuple(args.imports))


def parse_args(argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, List[Task], Optional[Entry], RunConfig]:
    """The options, the tasks to time (none for --bench data), the baseline entry and the run's settings."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.results_file and results_format(args.results_file, args.results_format) is None:
        parser.error(f'--results-file {args.results_file}: name it .csv or .json, or give --results-format')
    try:
        import_modules(tuple(args.imports))
    except ValueError as error:
        parser.error(str(error))
    check_torchcompile(parser, args)
    config = run_config(parser, args)
    if args.bench == 'data':
        if args.data_dir and not os.path.isdir(args.data_dir):
            parser.error(f'--data-dir {args.data_dir}: no such folder; give a folder with one subfolder of images '
                         f'per class, e.g. /imagenet/train')
        if not os.path.isfile(args.recipe):
            parser.error(f'--recipe {args.recipe}: no such file; give a training config, e.g. configs/posmlp_t.yaml')
        return args, [], None, config
    entries = parse_entries(parser, args)
    baseline = parse_baseline(parser, args, entries)
    tasks = [Task(entry, mode) for entry in entries for mode in BENCH_MODES[args.bench]]
    return args, tasks, baseline, config


START_TIME = time.monotonic()


def log(message: str):
    print(f'[{time.monotonic() - START_TIME:6.1f}s] {message}', file=sys.stderr, flush=True)


def bench_models(args: argparse.Namespace, tasks: List[Task], baseline: Optional[Entry], config: RunConfig):
    """Time the tasks and print their table; returns the rows."""
    interleave = args.interleave if args.interleave is not None else not args.suite
    log(f'{len(tasks)} tasks on {config.device}, {"a worker process each" if args.isolate else "all in this process"}'
        f', {"interleaved round by round" if interleave else "one at a time"}')
    rows = time_tasks(tasks, config, args.isolate, args.repeats, log, interleave)
    if baseline is not None:
        add_speed_vs_baseline(rows, tasks, baseline)
    extra_columns = ()
    if args.suite:
        add_reference_columns(rows, SUITES[args.suite])
        extra_columns = reference_columns(SUITES[args.suite])
    print(f'# img/s median (min-max) of {args.repeats} rounds x {config.steps} steps after {config.warmup} '
          f'warm-up steps')
    print(format_table(table_lines(rows, extra_columns)))
    if not (args.isolate or len(tasks) == 1):
        print('# peak MB: not reported when several tasks share one process; run without --no-isolate')
    return file_rows(rows)


def bench_data(args: argparse.Namespace):
    """Time the recipe's transforms through DataLoader workers and print their table; returns the rows."""
    worker_counts = sorted({1, args.workers})
    with tempfile.TemporaryDirectory(prefix='benchmark-jpegs-') as scratch:
        folder = args.data_dir
        if folder is None:
            log(f'writing {args.data_images} JPEGs, {args.data_long_side} px on the longer side, to {scratch}')
            folder = str(write_sample_jpegs(Path(scratch), args.data_images, args.data_long_side))
        rows = time_loaders(folder, args.recipe, args.img_size, worker_counts, args.batch_size, args.steps,
                            args.repeats, log)
    if args.data_dir is None:  # the temporary folder is gone: say what it held
        for row in rows:
            row['data'] = f'generated JPEGs, {args.data_long_side} px on the longer side'
    print(f'# {rows[0]["images_in_folder"]} images in {"generated JPEGs" if args.data_dir is None else folder} '
          f'(mean {rows[0]["mean_file_kb"]:.0f} KB), transforms of {args.recipe}; img/s median (min-max) of '
          f'{args.repeats} rounds')
    print(format_table(loader_table_lines(rows)))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, tasks, baseline, config = parse_args(argv)
    device = torch.device(config.device)
    environment = run_environment(command_line('benchmark.py', argv), device)
    print(f'# {environment["device_name"]} ({device}, threads: {config.threads or environment["torch_threads"]}), '
          f'torch {environment["torch"]}, timm {environment["timm"]}')
    try:
        rows = bench_data(args) if args.bench == 'data' else bench_models(args, tasks, baseline, config)
    except (BenchmarkError, DataError) as error:
        print(f'benchmark.py: error: {error}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('benchmark.py: interrupted', file=sys.stderr)
        return 130
    if args.results_file:
        if args.bench != 'data':
            environment.update(warmup=config.warmup, lr=config.lr, torch_threads=config.threads or
                               environment['torch_threads'], baseline=baseline.text if baseline else '')
        try:
            write_results(args.results_file, rows, environment, args.results_format)
        except OSError as error:
            print(f'benchmark.py: error: cannot write --results-file {args.results_file}: {error.strerror}; '
                  f'give a path in a writable folder', file=sys.stderr)
            return 1
        log(f'results written to {args.results_file}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
