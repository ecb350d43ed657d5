"""What the scripts write besides checkpoint files: a training run's folder (claimed for the run, its train.log,
summary.csv and args.yaml, and each epoch's record, whose checkpoints utils/run_checkpoints.py keeps), the
console log of every script, and one-line errors for files that cannot be written."""
import contextlib
import csv
import datetime
import errno
import fnmatch
import io
import itertools
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Tuple

from timm.utils import FormatterNoInfo

from models.checkpoint import PROCESS_UMASK, TEMPORARY_PREFIX, atomic_file
from .args import plain_args, write_args_yaml
from .distributed import Runtime, from_primary
from .errors import CheckpointError, OptionError, OutputError
from .run_checkpoints import (
    CheckpointKeeper, free_path, newest_checkpoint, remove_stale_temporaries, resume_point, superseded_path,
)
from .weights_choice import ranked_by

_logger = logging.getLogger(__name__)
_run_logger = logging.getLogger('train')

LOG_FILE = 'train.log'
ARGS_FILE = 'args.yaml'
SUMMARY_FILE = 'summary.csv'
METRIC_NAMES = ('loss', 'top1', 'top5')
# What a run leaves in its folder that another run would overwrite or mix with its own.
RUN_FILE_PATTERNS = ('last.pth.tar', SUMMARY_FILE, 'checkpoint-*.pth.tar')


# What to do about a file that cannot be written, by the error's errno; {option} names where the file goes.
OUTPUT_FIXES = {
    errno.ENOSPC: 'free space on that disk, or point {option} at another',
    errno.EDQUOT: 'your disk quota is used up: free space, or point {option} at another disk',
    errno.EROFS: 'that file system is read-only: point {option} at a writable disk',
    errno.EACCES: 'you may not write there: point {option} at a folder you can write to',
    errno.EPERM: 'you may not write there: point {option} at a folder you can write to',
    errno.ENAMETOOLONG: 'a file or folder name may have at most 255 bytes (a whole path 4096): shorten {option}',
    errno.ENOTDIR: 'a file is in the way of a folder: point {option} elsewhere',
    errno.EEXIST: 'a file is in the way of a folder: point {option} elsewhere',
    errno.EISDIR: 'a folder is in the way of the file: point {option} elsewhere',
}


def output_error(error: OSError, path: str, option: str = '--output', resumable: Optional[str] = None) -> OutputError:
    """One line for a file-system `error` on `path` (the error's own file when it names one) and its fix, which
    names the `option` that chose the path; `resumable` is a run folder whose newest checkpoint is offered to
    continue the run from."""
    path = error.filename or path
    fix = OUTPUT_FIXES.get(error.errno, 'check that path and its disk').format(option=option)
    message = f'cannot write {path}: {error.strerror or error}; {fix}.'
    checkpoint = newest_checkpoint(resumable) if resumable and os.path.isdir(resumable) else None
    if checkpoint:
        message += (f' The files written before are intact: once this is fixed, continue the run with '
                    f'--resume {checkpoint}.')
    return OutputError(message)


@contextlib.contextmanager
def writing(path: str, option: str = '--output', resumable: Optional[str] = None):
    """Turn an OSError into an OutputError that names the file and the fix (see output_error)."""
    try:
        yield
    except OSError as e:
        raise output_error(e, path, option, resumable) from None


def run_folder(args, resumed_args: Optional[dict] = None) -> str:
    """`--output/--experiment`, or the folder of the checkpoint a run resumes from (`resumed_args` are the
    options it recorded): unless --output/--experiment name another folder than the run was made with,
    wherever that folder has been moved since, or the current directory under a relative --output."""
    if args.resume:
        recorded = resumed_args or {}
        own_names = (recorded.get('output'), recorded.get('experiment'))
        if not args.experiment or (args.output, args.experiment) == own_names:
            return os.path.dirname(os.path.abspath(args.resume))
    name = args.experiment or '-'.join([
        datetime.datetime.now().strftime('%Y%m%d-%H%M%S'), args.model, str(args.img_size or 'default')])
    return os.path.join(args.output or os.path.join('output', 'train'), name)


def claim_run_folder(args, resumed_args: Optional[dict] = None) -> str:
    """Create the run's folder (see run_folder) and return it; OptionError when it holds another run.

    A generated name goes down to the second, so runs started together may make the same one: each creates
    its folder exclusively, and a name taken by another gets -1, -2, ... (like timm's get_outdir(inc=True))."""
    folder = run_folder(args, resumed_args)
    with writing(folder):
        if args.experiment or args.resume:
            conflict = run_folder_conflict(folder, args.resume)
            if conflict:
                raise OptionError(conflict)
            os.makedirs(folder, exist_ok=True)
            return folder
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        for copy in itertools.count():
            candidate = f'{folder}-{copy}' if copy else folder
            try:
                os.mkdir(candidate)
                return candidate
            except FileExistsError:
                continue


def args_yaml_path(folder: str, start_epoch: int) -> str:
    """Where a run starting with `start_epoch` writes its options: args.yaml, or, for a resumed run, beside
    the args.yaml the run was made with, args-resume-epochN.yaml (N = start_epoch; -2, -3 when taken)."""
    if start_epoch == 0 or not os.path.exists(os.path.join(folder, ARGS_FILE)):
        return os.path.join(folder, ARGS_FILE)
    return free_path(folder, f'args-resume-epoch{start_epoch}.yaml')


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
        checkpoint = newest_checkpoint(folder)
        if checkpoint is None:
            return (f'{folder} already holds a run ({listing}), but no checkpoint to resume it from (no last.pth.tar '
                    f'or checkpoint-N.pth.tar); a new run would overwrite it. Move or rename that folder, or pass '
                    f'another --experiment.')
        return (f'{folder} already holds a run ({listing}); a new run would overwrite it. To continue that run, '
                f'pass --resume {checkpoint}; to start a new one, pass another --experiment.')
    if os.path.realpath(os.path.dirname(os.path.abspath(resume))) == os.path.realpath(folder):
        return None
    return (f'{folder} holds another run ({listing}) than the one --resume {resume} continues, and the two '
            f'would be mixed. Leave out --experiment to continue in the checkpoint\'s own folder, or pass an '
            f'--experiment whose folder is new.')


class RunLogHandler(logging.FileHandler):
    """train.log. A line that cannot be written (a full disk) stops the run with an OutputError, once: the
    handler takes itself out of logging first, so the error still reaches the console."""

    def handleError(self, record):
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            return super().handleError(record)
        logging.getLogger().removeHandler(self)
        with contextlib.suppress(OSError):
            self.close()
        raise output_error(error, self.baseFilename, resumable=os.path.dirname(self.baseFilename))


# Warnings logged while a run's options are read, before its log file exists (recorded arguments of a resumed
# checkpoint that are dropped, say): `held_for_the_run_log` holds them, and setup_logging writes them once it opens
# the run's log.
_held_records: List[logging.LogRecord] = []


class _HeldRecords(logging.Handler):
    def emit(self, record: logging.LogRecord):
        _held_records.append(record)


@contextlib.contextmanager
def held_for_the_run_log():
    """Hold the warnings logged in this block for the run's log; if the block fails, no log follows, so they are
    printed at once."""
    holder = _HeldRecords(logging.WARNING)
    logging.getLogger().addHandler(holder)
    try:
        yield
    except BaseException:
        for record in _held_records:
            print(f'{record.levelname.lower()}: {record.getMessage()}', file=sys.stderr)
        _held_records.clear()
        raise
    finally:
        logging.getLogger().removeHandler(holder)


def setup_logging(log_path: Optional[str], primary: bool):
    """Rank 0 logs INFO to stdout and to `log_path`; the other ranks only warnings and errors. With a log file
    (train.py, on every rank), the warnings held while the options were read are logged first."""
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(FormatterNoInfo())
    handlers = [console]
    if primary and log_path:
        with writing(log_path):
            log_file = RunLogHandler(log_path)
        log_file.setFormatter(logging.Formatter('%(asctime)s %(name)s [%(levelname)s] %(message)s'))
        handlers.append(log_file)
    logging.basicConfig(level=logging.INFO if primary else logging.WARNING, handlers=handlers, force=True)
    logging.captureWarnings(True)
    if log_path:
        log_held_warnings()


def log_held_warnings():
    """Log the warnings held while the options were read, through the handlers there are now."""
    for record in _held_records:
        logging.getLogger(record.name).handle(record)
    _held_records.clear()


@dataclass
class RunStart:
    folder: str
    resumed_epoch: Optional[int]  # the last finished epoch of the run --resume continues
    resumed_args: Optional[dict]  # the options that run recorded (on rank 0; None elsewhere)


def open_run_folder(args, runtime: Runtime) -> RunStart:
    """Claim the run's folder and start its log there, removing what interrupted writes left in it.

    Rank 0 checks the checkpoint to resume from and claims the folder before anything is written: the ranks'
    clocks may name a new folder differently, and a folder on rank 0's disk may not be visible to the others."""
    setup_logging(None, runtime.is_primary)
    folder, resumed_epoch, resumed_args, problem = None, None, None, None
    if runtime.is_primary:
        try:
            if args.resume:
                resumed_epoch, resumed_args = resume_point(args.resume)
            folder = claim_run_folder(args, resumed_args)
        except (CheckpointError, OptionError, OutputError) as e:
            problem = e
    folder, resumed_epoch, problem = from_primary((folder, resumed_epoch, problem), runtime)
    if problem:
        log_held_warnings()  # to the console: there will be no run log
        raise problem
    setup_logging(os.path.join(folder, LOG_FILE), runtime.is_primary)
    _run_logger.info(f'Training on {runtime.device}, {runtime.world_size} process(es); output in {folder}')
    if runtime.is_primary:
        with writing(folder):
            stale = remove_stale_temporaries(folder)
        if stale:
            _run_logger.warning(f'Removed {len(stale)} temporary file(s) that an interrupted write left: '
                                + ', '.join(stale))
    return RunStart(folder, resumed_epoch, resumed_args)


def summary_row(epoch: int, lr: float, train: dict, evaluation: dict, ema: Optional[dict]) -> dict:
    """One summary.csv row: epoch, lr, train_loss, eval_loss/top1/top5 and, with EMA, ema_loss/top1/top5."""
    row = {'epoch': epoch, 'lr': lr, 'train_loss': train['loss']}
    row.update({f'eval_{k}': evaluation[k] for k in METRIC_NAMES})
    if ema is not None:
        row.update({f'ema_{k}': ema[k] for k in METRIC_NAMES})
    return row


def write_atomically(path: str, text: str):
    """Write `text` through models.atomic_file: a crash or a full disk leaves the old file or the new one."""
    with atomic_file(path, 'w', newline='', encoding='utf-8') as f:
        f.write(text)


@contextlib.contextmanager
def atomic_folder(path: str, replace: bool = False):
    """A folder that becomes `path` only once it is whole, as models.atomic_file does for files: it is filled
    hidden beside `path` (`.tmp-XXXXXXXX-<name>`), given the modes the umask gives new files and folders
    (the temporary folder, and files safetensors writes, start private), then renamed into place; a failure
    removes it and leaves `path` as it was. `replace` removes a folder already at `path` first."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=TEMPORARY_PREFIX, suffix=f'-{os.path.basename(path)}', dir=parent)
    try:
        yield staging
        for folder, _, files in os.walk(staging):
            os.chmod(folder, 0o777 & ~PROCESS_UMASK)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o666 & ~PROCESS_UMASK)
        if replace and os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _read_text(path: str) -> str:
    if not os.path.exists(path):
        return ''
    with open(path, newline='') as f:
        return f.read()


def _parse_summary(text: str) -> Tuple[List[str], List[dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=''))
    return list(reader.fieldnames or []), list(reader)


def read_summary_rows(path: str) -> List[dict]:
    """The rows of a run's summary.csv ({column: text}, one per epoch); none when there is no such file."""
    return _parse_summary(_read_text(path))[1]


def _summary_text(columns: List[str], rows: List[dict]) -> str:
    text = io.StringIO(newline='')
    writer = csv.DictWriter(text, fieldnames=columns, restval='')
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def append_summary(path: str, row: dict):
    """Append an epoch's row. A row with columns the file lacks (EMA turned on at resume) rewrites the file,
    atomically, with the union of the columns; the cells a row has no value for stay empty."""
    columns, rows = _parse_summary(_read_text(path))
    if columns and set(row) <= set(columns):
        size = os.path.getsize(path)
        try:
            with open(path, 'a', newline='') as f:
                csv.DictWriter(f, fieldnames=columns, restval='').writerow(row)
        except OSError:
            # A full disk may take part of the row: cut it off, so the file holds whole rows only.
            with contextlib.suppress(OSError):
                os.truncate(path, size)
            raise
        return
    columns += [name for name in row if name not in columns]
    write_atomically(path, _summary_text(columns, rows + [row]))


def supersede_summary_rows(path: str, start_epoch: int):
    """Drop the rows of the epochs from `start_epoch` on, which a resumed run redoes. The whole old file is
    first kept in superseded/, beside those epochs' checkpoints; both files are written atomically."""
    old = _read_text(path)
    columns, rows = _parse_summary(old)
    kept = [row for row in rows if int(float(row['epoch'])) < start_epoch]
    if len(kept) == len(rows):
        return
    copy = superseded_path(os.path.dirname(path), os.path.basename(path))
    write_atomically(copy, old)
    write_atomically(path, _summary_text(columns, kept))
    _logger.warning(f'Resuming with epoch {start_epoch}: {len(rows) - len(kept)} {os.path.basename(path)} row(s) '
                    f'of the epochs it redoes were dropped; the whole old file is kept as {copy}.')


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


class RunRecorder:
    """What rank 0 keeps of a run in its folder: args.yaml, and for each epoch a summary.csv row, its checkpoints
    (utils.run_checkpoints.CheckpointKeeper), W&B's log and a line in train.log. A resumed run picks up the
    checkpoints and rows it left, setting aside those of the epochs it redoes."""

    def __init__(self, folder: str, args, start_epoch: int):
        self.folder = folder
        self.ranked_by = ranked_by(args)
        self.summary = os.path.join(folder, SUMMARY_FILE)
        self.keeper = CheckpointKeeper(folder, args.checkpoint_hist, decreasing=args.eval_metric == 'loss')
        with writing(folder):
            write_args_yaml(args, args_yaml_path(folder, start_epoch))
            if start_epoch > 0:
                self.keeper.restore(start_epoch - 1)
                supersede_summary_rows(self.summary, start_epoch)
        self.wandb = WandbLogger(args.log_wandb, plain_args(args), folder)

    def record(self, state: dict, seconds: float, train: dict, evaluation: dict, ema: Optional[dict],
               unreadable: int):
        """Write the epoch's row and checkpoints (`state`, from run_checkpoints.training_state) and log its line."""
        epoch, metric = state['epoch'], state['metric']
        # The row goes first: a run killed before its checkpoint redoes the epoch and trims the row.
        row = summary_row(epoch, train['lr'], train, evaluation, ema)
        with writing(self.folder, resumable=self.folder):
            append_summary(self.summary, row)
            is_best = self.keeper.save(state)
        self.wandb.log(row)
        _run_logger.info(
            f'Epoch {epoch} done in {seconds:.1f}s: train loss {train["loss"]:.4f} | eval {format_metrics(evaluation)}'
            + (f' | ema {format_metrics(ema)}' if ema else '')
            + f' | {self.ranked_by} {metric:.3f}{" (new best)" if is_best else ""}'
            + (f' | {unreadable} unreadable images skipped' if unreadable else ''))

    def finish(self):
        if self.keeper.best is not None:
            best_metric, best_epoch = self.keeper.best
            _run_logger.info(f'Best {self.ranked_by}: {best_metric:.3f} at epoch {best_epoch}, saved in '
                             f'{self.keeper.path("model_best.pth.tar")}')
