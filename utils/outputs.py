"""A training run's folder and what rank 0 writes into it besides checkpoints: the log and summary.csv."""
import csv
import datetime
import fnmatch
import logging
import os
import sys
from typing import List, Optional

from timm.utils import FormatterNoInfo

_logger = logging.getLogger(__name__)

LOG_FILE = 'train.log'
SUMMARY_FILE = 'summary.csv'
METRIC_NAMES = ('loss', 'top1', 'top5')
# What a run leaves in its folder that another run would overwrite or mix with its own.
RUN_FILE_PATTERNS = ('last.pth.tar', SUMMARY_FILE, 'checkpoint-*.pth.tar')


def run_folder(args) -> str:
    """`--output/--experiment`; a resumed run continues in its checkpoint's folder unless --experiment is given."""
    if args.resume and not args.experiment:
        return os.path.dirname(os.path.abspath(args.resume))
    name = args.experiment or '-'.join([
        datetime.datetime.now().strftime('%Y%m%d-%H%M%S'), args.model, str(args.img_size or 'default')])
    return os.path.join(args.output or os.path.join('output', 'train'), name)


def run_files(folder: str) -> List[str]:
    """The names of the files in `folder` that a training run wrote; none for a new folder."""
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder)
                  if any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_FILE_PATTERNS))


def run_folder_conflict(folder: str, resume: str) -> Optional[str]:
    """Why this run must not write into `folder`, or None: the folder holds another run's files, and only
    a run resumed from a checkpoint in that same folder continues it."""
    found = run_files(folder)
    if not found:
        return None
    listing = ', '.join(found[:5]) + (f' and {len(found) - 5} more' if len(found) > 5 else '')
    if not resume:
        return (f'{folder} already holds a run ({listing}); a new run would overwrite it. To continue that run, '
                f'pass --resume {os.path.join(folder, "last.pth.tar")}; to start a new one, pass another '
                f'--experiment.')
    if os.path.realpath(os.path.dirname(os.path.abspath(resume))) == os.path.realpath(folder):
        return None
    return (f'{folder} holds another run ({listing}) than the one --resume {resume} continues, and the two '
            f'would be mixed. Leave out --experiment to continue in the checkpoint\'s own folder, or pass an '
            f'--experiment whose folder is new.')


def setup_logging(log_path: Optional[str], primary: bool):
    """Rank 0 logs INFO to stdout and to `log_path`; the other ranks only warnings and errors."""
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(FormatterNoInfo())
    handlers = [console]
    if primary and log_path:
        log_file = logging.FileHandler(log_path)
        log_file.setFormatter(logging.Formatter('%(asctime)s %(name)s [%(levelname)s] %(message)s'))
        handlers.append(log_file)
    logging.basicConfig(level=logging.INFO if primary else logging.WARNING, handlers=handlers, force=True)
    logging.captureWarnings(True)


def summary_row(epoch: int, lr: float, train: dict, evaluation: dict, ema: Optional[dict]) -> dict:
    """One summary.csv row: epoch, lr, train_loss, eval_loss/top1/top5 and, with EMA, ema_loss/top1/top5."""
    row = {'epoch': epoch, 'lr': lr, 'train_loss': train['loss']}
    row.update({f'eval_{k}': evaluation[k] for k in METRIC_NAMES})
    if ema is not None:
        row.update({f'ema_{k}': ema[k] for k in METRIC_NAMES})
    return row


def append_summary(path: str, row: dict):
    """Append an epoch's row. A row with columns the file lacks (EMA turned on at resume) rewrites the file,
    atomically, with the union of the columns; the cells a row has no value for stay empty."""
    columns, rows = [], []
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline='') as f:
            reader = csv.DictReader(f)
            columns, rows = list(reader.fieldnames or []), list(reader)
    if columns and set(row) <= set(columns):
        with open(path, 'a', newline='') as f:
            csv.DictWriter(f, fieldnames=columns, restval='').writerow(row)
        return
    columns += [name for name in row if name not in columns]
    partial = path + '.tmp'
    with open(partial, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval='')
        writer.writeheader()
        writer.writerows(rows + [row])
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def format_metrics(metrics: dict) -> str:
    return f'loss {metrics["loss"]:.4f}  top1 {metrics["top1"]:.3f}  top5 {metrics["top5"]:.3f}'


class WandbLogger:
    """Weights & Biases logging when asked for and installed; otherwise one warning and nothing."""

    def __init__(self, enabled: bool, args: dict, folder: str):
        self.run = None
        if not enabled:
            return
        try:
            import wandb
        except ImportError:
            _logger.warning('--log-wandb: the wandb package is not installed (pip install wandb); not logging to it.')
            return
        self.run = wandb.init(project='posmlp', name=os.path.basename(folder), config=args, dir=folder)

    def log(self, row: dict):
        if self.run is not None:
            self.run.log(row)
