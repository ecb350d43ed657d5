"""The paper's gate comparison at small scale: PoSGU (GQPE, LRPE) against gMLP's SGU on the digits.

    python -m utils.ablation --out logs/ablation

Every gate trains the same architecture with the same recipe, configs/quickstart.yaml (only the
gate changes), for every seed and in two data regimes:
  full     the whole digits training split, for the config's epochs;
  reduced  a class-stratified fraction of it (one fixed subset, the same for every gate and seed),
           for 1/fraction times the epochs and warmup epochs, so that both regimes make about the
           same number of optimizer updates and differ only in how many distinct images they see.
Both regimes are evaluated on the same full validation split. Each run is one `train.py` process;
its run folder goes under --runs-dir (checkpoints stay there, out of git), its summary.csv and
args.yaml are copied to --out/<run>/, and --out gets results.csv (one row per run) and table.md
(mean and sample standard deviation over seeds). Runs already finished with the same settings
are reused unless --rerun is given. Options after `--` go to every train.py call as they are.
"""
import argparse
import json
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import utils.offline  # noqa: F401  (first: the hub client reads its switches when timm imports it)

import yaml

from utils.config import read_config
from utils.errors import AblationError, DataError
from utils.option_checks import Number, at_least
from utils.outputs import atomic_folder, read_summary_rows, write_atomically
from utils.results import write_results

ROOT = Path(__file__).resolve().parents[1]
GATES = ('gqpe', 'lrpe', 'sgu')
REGIMES = ('full', 'reduced')
SUBSET_LIST = 'subset.txt'  # inside a reduced data folder: the training images it holds
RUN_RECORD = 'ablation_run.json'  # inside a run folder: the settings it ran with and its wall time
SHARE = Number(float, 'between 0 and 1 (a share, e.g. 0.1)', lambda value: 0 < value < 1)
RESULT_FIELDS = ('run', 'gate', 'regime', 'seed', 'train_images', 'epochs', 'params', 'final_top1', 'best_top1',
                 'best_epoch', 'final_eval_loss', 'seconds')


@dataclass
class Regime:
    name: str
    data_dir: Path
    train_images: int
    epochs: int
    warmup_epochs: int


def class_folders(split_dir: Path) -> List[Path]:
    folders = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not folders:
        raise AblationError(f'{split_dir} has no class folders; expected {split_dir}/<class>/<image>.')
    return folders


def stratified_subset(train_dir: Path, fraction: float, seed: int) -> List[str]:
    """Image paths relative to `train_dir`: `fraction` of every class (at least one), chosen with `seed`."""
    rng = random.Random(seed)
    chosen = []
    for folder in class_folders(train_dir):
        images = sorted(p.name for p in folder.iterdir() if p.is_file())
        count = max(1, round(fraction * len(images)))
        chosen += [f'{folder.name}/{name}' for name in sorted(rng.sample(images, count))]
    return chosen


def build_reduced_folder(source: Path, fraction: float, seed: int, dest: Path) -> Path:
    """An image folder at `dest` with a stratified subset of source/train and all of source/val.

    Reused when it already holds exactly that subset; otherwise assembled beside `dest` and renamed
    into place, so an interrupted build never looks finished.
    """
    train_dir = source / 'train'
    val_dir = next((source / s for s in ('val', 'validation') if (source / s).is_dir()), None)
    if not train_dir.is_dir() or val_dir is None:
        raise AblationError(f'{source} needs train/ and val/ (one folder per class) to draw a reduced '
                            f'training set from; check --data-dir.')
    subset = stratified_subset(train_dir, fraction, seed)
    listing = dest / SUBSET_LIST
    if listing.is_file() and listing.read_text().split() == subset and (dest / 'val').is_dir():
        return dest
    with atomic_folder(str(dest), replace=True) as staging:
        for relative in subset:
            (Path(staging) / 'train' / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(train_dir / relative, Path(staging) / 'train' / relative)
        shutil.copytree(val_dir, Path(staging) / 'val')
        (Path(staging) / SUBSET_LIST).write_text('\n'.join(subset) + '\n')
    return dest


def count_images(split_dir: Path) -> int:
    return sum(1 for folder in class_folders(split_dir) for p in folder.iterdir() if p.is_file())


def load_config(path: Path) -> dict:
    """The training config every run shares, read as train.py reads it (its keys with underscores)."""
    return {str(k).replace('-', '_'): v for k, v in read_config(build_parser(), str(path)).items()}


def parse_model_kwargs(items: Sequence[str]) -> dict:
    """KEY=VALUE pairs, values as YAML (so lists read as lists: win_size=[8,4,2,1])."""
    kwargs = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise AblationError(f'--model-kwargs {item!r}: give KEY=VALUE, e.g. win_size=[8,4,2,1].')
        kwargs[key] = yaml.safe_load(value)
    return kwargs


def shown_path(path: Path) -> str:
    """Relative to the repository (train.py's working directory) when inside it, so records travel."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def train_command(config: Path, regime: Regime, gate: str, seed: int, model_kwargs: dict, runs_dir: Path,
                  run: str, extra: Sequence[str]) -> List[str]:
    # train.py's --model-kwargs replaces the config's mapping as a whole, so the full mapping is given.
    kwargs = [f'{k}={v!r}' for k, v in dict(model_kwargs, gate=gate).items()]
    return [
        sys.executable, 'train.py', '-c', shown_path(config),
        '--dataset', '', '--data-dir', shown_path(regime.data_dir),
        '--model-kwargs', *kwargs,
        '--seed', str(seed), '--epochs', str(regime.epochs), '--warmup-epochs', str(regime.warmup_epochs),
        '--output', shown_path(runs_dir), '--experiment', run, '--checkpoint-hist', '0',
        *extra,
    ]


def finished_record(run_dir: Path, command: List[str], epochs: int) -> Optional[dict]:
    """The record of a finished run made by the same command, or None if it has to run (again)."""
    record_path, summary = run_dir / RUN_RECORD, run_dir / 'summary.csv'
    if not record_path.is_file() or not summary.is_file() or not (run_dir / 'last.pth.tar').is_file():
        return None
    record = json.loads(record_path.read_text())
    if record.get('command') != command[1:] or len(read_summary_rows(summary)) != epochs:
        return None
    return record


def count_parameters(checkpoint: Path) -> int:
    import models
    model = models.create_model_from_checkpoint(str(checkpoint), use_ema=False)
    return sum(p.numel() for p in model.parameters())


def run_one(command: List[str], run_dir: Path, epochs: int, rerun: bool) -> dict:
    """Train one run (or reuse it); returns its record: the command and its wall time."""
    record = None if rerun else finished_record(run_dir, command, epochs)
    if record is not None:
        print(f'  reusing {run_dir} (finished with the same settings; --rerun to train it again)', flush=True)
        return record
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a partial or different run of the same name
    run_dir.mkdir(parents=True)
    start = time.time()
    with open(run_dir / 'stdout.txt', 'w') as log:
        returncode = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - start
    if returncode != 0:
        tail = ''.join((run_dir / 'stdout.txt').read_text().splitlines(keepends=True)[-15:])
        raise AblationError(f'train.py failed (exit {returncode}) for {run_dir.name}; the end of its output '
                            f'({run_dir / "stdout.txt"}):\n{tail}')
    record = dict(command=command[1:], seconds=round(seconds, 1))
    (run_dir / RUN_RECORD).write_text(json.dumps(record, indent=1))
    return record


def collect(run: str, gate: str, regime: Regime, seed: int, run_dir: Path, seconds: float) -> dict:
    rows = read_summary_rows(run_dir / 'summary.csv')
    top1 = [float(r['eval_top1']) for r in rows]
    best = max(range(len(top1)), key=top1.__getitem__)
    return dict(
        run=run, gate=gate, regime=regime.name, seed=seed, train_images=regime.train_images, epochs=len(rows),
        params=count_parameters(run_dir / 'last.pth.tar'), final_top1=top1[-1], best_top1=top1[best],
        best_epoch=int(rows[best]['epoch']), final_eval_loss=float(rows[-1]['eval_loss']), seconds=seconds,
    )


def mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f'{values[0]:.2f}'
    return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'


def write_tables(results: List[dict], out: Path, header: str):
    """results.csv (one row per run) and table.md (mean and std over seeds per gate and regime)."""
    write_results(str(out / 'results.csv'), [{k: row[k] for k in RESULT_FIELDS} for row in results], environment={})
    lines = [header, '',
             '| gate | regime | train images | epochs | params | top-1 final epoch | top-1 best epoch | n |',
             '|---|---|---:|---:|---:|---|---|---:|']
    groups: Dict[tuple, List[dict]] = {}
    for row in results:
        groups.setdefault((row['regime'], row['gate']), []).append(row)
    for (regime, gate), rows in groups.items():
        lines.append(
            f'| {gate} | {regime} | {rows[0]["train_images"]} | {rows[0]["epochs"]} | {rows[0]["params"]:,} | '
            f'{mean_std([r["final_top1"] for r in rows])} | {mean_std([r["best_top1"] for r in rows])} | '
            f'{len(rows)} |')
    write_atomically(str(out / 'table.md'), '\n'.join(lines) + '\n')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m utils.ablation', description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog='Options after -- are passed to every train.py call, e.g. -- --max-steps-per-epoch 2.')
    parser.add_argument('--out', default='logs/ablation', help='results.csv, table.md and each run\'s summary/args')
    parser.add_argument('--runs-dir', default='output/ablation', help='train.py run folders (checkpoints)')
    parser.add_argument('--config', default='configs/quickstart.yaml', help='the recipe every run shares')
    parser.add_argument('--data-dir', default=None, help="full data set (default: the config's data_dir)")
    parser.add_argument('--gates', nargs='+', default=list(GATES), choices=GATES)
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--regimes', nargs='+', default=list(REGIMES), choices=REGIMES)
    parser.add_argument('--reduced-fraction', type=SHARE, default=0.1,
                        help='share of every class of the training split the reduced regime keeps')
    parser.add_argument('--subset-seed', type=int, default=0, help='seed that picks the reduced training set')
    parser.add_argument('--epochs', type=at_least(1), default=None,
                        help="epochs of the full regime (default: the config's); the reduced regime runs "
                             "1/fraction times as many")
    # Spelled as in train.py and benchmark.py; --model-kwarg is the old name, kept for the commands in logs/.
    parser.add_argument('--model-kwargs', '--model-kwarg', nargs='+', action='extend', default=[], metavar='KEY=VALUE',
                        help="change the config's model_kwargs for every gate, e.g. win_size=[8,4,2,1]")
    parser.add_argument('--rerun', action='store_true', help='train again runs that already finished')
    return parser


def run_ablation(args, extra: Sequence[str]):
    extra_model_kwargs = parse_model_kwargs(args.model_kwargs)
    config_path = Path(args.config).resolve()
    config = load_config(config_path)
    data_dir = Path(args.data_dir or config.get('data_dir') or '')
    if not str(data_dir):
        raise AblationError(f'no data dir: {args.config} names none; pass --data-dir.')
    data_dir = (ROOT / data_dir) if not data_dir.is_absolute() else data_dir
    if config.get('dataset') == 'digits':
        from utils.digits import prepare_digits
        prepare_digits(data_dir)
    epochs = args.epochs or int(config.get('epochs', 0))
    warmup = int(config.get('warmup_epochs', 0))
    if epochs < 1:
        raise AblationError(f'{args.config} sets no epochs; pass --epochs.')
    model_kwargs = dict(config.get('model_kwargs') or {}, **extra_model_kwargs)
    model_kwargs.pop('gate', None)

    scale = round(1 / args.reduced_fraction)
    regimes = {}
    if 'full' in args.regimes:
        regimes['full'] = Regime('full', data_dir, count_images(data_dir / 'train'), epochs, warmup)
    if 'reduced' in args.regimes:
        percent = f'{100 * args.reduced_fraction:g}'
        reduced_dir = build_reduced_folder(data_dir, args.reduced_fraction, args.subset_seed,
                                           data_dir.parent / f'{data_dir.name}-train{percent}pct-seed{args.subset_seed}')
        regimes['reduced'] = Regime('reduced', reduced_dir, count_images(reduced_dir / 'train'),
                                    epochs * scale, warmup * scale)

    out, runs_dir = Path(args.out), Path(args.runs_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if 'reduced' in regimes:
        shutil.copy2(regimes['reduced'].data_dir / SUBSET_LIST, out / 'reduced_train_images.txt')
    results = []
    total = len(regimes) * len(args.gates) * len(args.seeds)
    for regime in regimes.values():
        for gate in args.gates:
            for seed in args.seeds:
                run = f'{regime.name}-{gate}-seed{seed}'
                run_dir = runs_dir / run
                print(f'[{len(results) + 1}/{total}] {run}: {regime.train_images} training images, '
                      f'{regime.epochs} epochs', flush=True)
                command = train_command(config_path, regime, gate, seed, model_kwargs, runs_dir, run, extra)
                record = run_one(command, run_dir, regime.epochs, args.rerun)
                results.append(collect(run, gate, regime, seed, run_dir, record['seconds']))
                (out / run).mkdir(exist_ok=True)
                for name in ('summary.csv', 'args.yaml'):
                    shutil.copy2(run_dir / name, out / run / name)
                print(f'  top-1 final {results[-1]["final_top1"]:.2f}, best {results[-1]["best_top1"]:.2f} '
                      f'(epoch {results[-1]["best_epoch"]}), {record["seconds"]:.0f} s', flush=True)

    total_seconds = sum(r['seconds'] for r in results)
    command = shlex.join(['python', '-m', 'utils.ablation', *argv_for_table(args), *(['--', *extra] if extra else [])])
    val_images = count_images(next(iter(regimes.values())).data_dir / 'val')
    header = [
        f'Gate ablation on {data_dir.name}: recipe {args.config} for every run, only the gate differs. '
        f'Top-1 in % on the {val_images} validation images; mean ± sample std over {len(args.seeds)} seed(s).',
        '- final epoch: the model at the end of training; best epoch: the highest per-epoch validation '
        'top-1 (chosen on the validation set, so optimistic).',
    ]
    if extra_model_kwargs:
        header.append(f'- architecture changed from the config for every gate: '
                      f'{", ".join(f"{k}={v}" for k, v in extra_model_kwargs.items())}.')
    if 'reduced' in regimes:
        header.append(f'- reduced: {args.reduced_fraction:g} of every class of the training split (one subset, '
                      f'seed {args.subset_seed}, listed in reduced_train_images.txt), {scale}x the epochs and '
                      f'warmup epochs, so about as many optimizer updates as full.')
    header += [f'- compute: {total_seconds / 60:.1f} min of training in all.', f'- reproduce: `{command}`']
    write_tables(results, out, '\n'.join(header))
    print(f'wrote {out / "results.csv"} and {out / "table.md"} ({total_seconds / 60:.1f} min of training)')
    print((out / 'table.md').read_text())


def argv_for_table(args) -> List[str]:
    """The options that differ from the defaults, to state the command that reproduces the table."""
    defaults = build_parser().parse_args([])
    shown = []
    for key, value in vars(args).items():
        if value == getattr(defaults, key):
            continue
        flag = '--' + key.replace('_', '-')
        if isinstance(value, bool):
            shown.append(flag)
        elif isinstance(value, list):
            shown += [flag, *map(str, value)]
        else:
            shown += [flag, str(value)]
    return shown


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index('--') + 1:] if '--' in argv else []
    args = build_parser().parse_args(argv[:argv.index('--')] if '--' in argv else argv)
    try:
        run_ablation(args, extra)
    except (AblationError, DataError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
