"""Training checkpoints: what they hold, the files kept in the output folder, and resuming from them.

Every epoch writes `checkpoint-<epoch>.pth.tar` while it ranks among the best `history` epochs,
`model_best.pth.tar` when it is the best so far, and `last.pth.tar`, in that order and each through
`models.save_checkpoint_file` (temporary file + rename): a crash at any point leaves every file
whole, and `last.pth.tar` is never ahead of the others. A resumed run moves the files of epochs
after the one it resumes from into `superseded/`, since it redoes those epochs (a copy of the
whole summary.csv goes there too, see `utils.outputs.supersede_summary_rows`).
"""
import logging
import os
import re
from typing import Any, Dict, List, Optional, Tuple

from timm.scheduler import PlateauLRScheduler
from timm.utils import get_state_dict, unwrap_model

import models
from models.checkpoint import TEMPORARY_PREFIX

from .amp import scaler_kind, scaler_state_kind
from .errors import CheckpointError

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
LAST = 'last.pth.tar'
BEST = 'model_best.pth.tar'
SUPERSEDED = 'superseded'
HISTORY_PATTERN = re.compile(r'checkpoint-(\d+)\.pth\.tar')
# What an interrupted write (kill -9, power loss) leaves in a run folder: models.atomic_file's temporary files,
# `.tmp-XXXXXXXX-<name>`, and those of earlier versions (`.tmp-XXXXXXXX.pth.tar`, `summary.csv.tmp`).
STALE_TEMPORARY = re.compile(re.escape(TEMPORARY_PREFIX) + r'[a-z0-9_]{8}(-.+|\.pth\.tar)|summary(-\d+)?\.csv\.tmp')
# Keys training_state always writes (the authors' checkpoints have `arch` and an argparse `args` instead).
TRAINING_KEYS = frozenset({'epoch', 'model_name', 'model_kwargs', 'state_dict', 'optimizer', 'scheduler', 'args'})


def training_state(epoch: int, model_name: str, model_kwargs: dict, model, optimizer, scheduler, loss_scaler,
                   model_ema, args: dict, metric: Optional[float],
                   class_to_idx: Optional[dict] = None, global_batch: Optional[int] = None) -> Dict[str, Any]:
    """The checkpoint of an epoch just finished, as plain data (loads with weights_only=True).

    `class_to_idx` (class folder name -> label) lets evaluation label folders that hold fewer classes
    than the head; datasets without class folders have none, and the key is left out. `global_batch` (images
    per update over all processes) lets a resume on another number of processes say that it differs."""
    state = dict(
        epoch=epoch,
        model_name=model_name,
        model_kwargs=dict(model_kwargs),
        state_dict=get_state_dict(model, unwrap_model),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict() if scheduler is not None else None,
        scaler=loss_scaler.state_dict() if loss_scaler is not None else None,
        args=dict(args),
        metric=metric,
        version=FORMAT_VERSION,
    )
    if class_to_idx is not None:
        state['class_to_idx'] = dict(class_to_idx)
    if global_batch is not None:
        state['global_batch'] = global_batch
    if model_ema is not None:
        state['state_dict_ema'] = get_state_dict(model_ema.module, unwrap_model)
    return state


def newest_checkpoint(folder: str) -> Optional[str]:
    """The checkpoint a run in `folder` resumes from: last.pth.tar, else the latest epoch's checkpoint-N.pth.tar
    (last.pth.tar is missing when a run was stopped in its first epoch after writing the summary, or moved to
    superseded/ by a resume stopped before its first epoch ended); None when there is neither."""
    if os.path.isfile(os.path.join(folder, LAST)):
        return os.path.join(folder, LAST)
    epochs = [int(match.group(1)) for match in map(HISTORY_PATTERN.fullmatch, os.listdir(folder)) if match]
    return os.path.join(folder, f'checkpoint-{max(epochs)}.pth.tar') if epochs else None


def remove_stale_temporaries(output_dir: str) -> List[str]:
    """Remove the temporary files that interrupted writes left in the run folder `output_dir` and its
    superseded/ (nothing else, and nothing outside them); returns their paths. Only the process that owns
    the folder may call this: a temporary file of a write under way would be removed too."""
    removed = []
    for folder in (output_dir, os.path.join(output_dir, SUPERSEDED)):
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if STALE_TEMPORARY.fullmatch(name) and os.path.isfile(path) and not os.path.islink(path):
                os.remove(path)
                removed.append(path)
    return removed


def free_path(folder: str, name: str) -> str:
    """A path for `name` in `folder` that no file has: NAME, else NAME-2, NAME-3, ... (before the extension)."""
    stem, dot, extension = name.partition('.')
    target, copy = name, 1
    while os.path.exists(os.path.join(folder, target)):
        copy += 1
        target = f'{stem}-{copy}{dot}{extension}'
    return os.path.join(folder, target)


def superseded_path(output_dir: str, name: str) -> str:
    """A free path for `name` in `output_dir`/superseded/, so what several resumes over the same epochs set
    aside is all kept."""
    folder = os.path.join(output_dir, SUPERSEDED)
    os.makedirs(folder, exist_ok=True)
    return free_path(folder, name)


class CheckpointKeeper:
    """Keeps `last`, the best `history` epoch checkpoints and `model_best` in `output_dir`."""

    def __init__(self, output_dir: str, history: int = 10, decreasing: bool = False):
        self.output_dir = output_dir
        self.history = max(history, 0)
        self.decreasing = decreasing
        self.kept: List[Tuple[float, int]] = []  # (metric, epoch), best first
        self.best: Optional[Tuple[float, int]] = None

    def path(self, name: str) -> str:
        return os.path.join(self.output_dir, name)

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.decreasing else a > b

    def _rank(self, entries):
        return sorted(entries, key=lambda e: e[0], reverse=not self.decreasing)

    def restore(self, resumed_epoch: int):
        """Pick up the history and best of a run resumed after `resumed_epoch` from the files it left.

        Files of later epochs (left by a resume from an earlier checkpoint, or by a crash between an
        epoch's checkpoints and its last.pth.tar) belong to epochs this run redoes: they are moved to
        `superseded/`, and a moved (or missing) model_best is re-created from the best checkpoint kept.
        """
        entries, later = [], []
        for name in sorted(os.listdir(self.output_dir)):
            match = HISTORY_PATTERN.fullmatch(name)
            if not match:
                continue
            epoch = int(match.group(1))
            if epoch > resumed_epoch:
                later.append(name)
                continue
            # Mapped, not read: only the metric is needed, and each file holds a whole training state.
            metric = models.load_checkpoint_file(self.path(name), mmap=True).get('metric')
            if metric is not None:
                entries.append((float(metric), epoch))
        self.kept = self._rank(entries)
        tails = {name: models.load_checkpoint_file(self.path(name), mmap=True)
                 for name in (BEST, LAST) if os.path.isfile(self.path(name))}
        later += [name for name, state in tails.items()
                  if state.get('epoch') is not None and state['epoch'] > resumed_epoch]
        if later:
            moved = [self._supersede(name) for name in later]
            _logger.warning(f'Resuming after epoch {resumed_epoch}: files of the later epochs this run redoes were '
                            f'moved to {self.path(SUPERSEDED)}/: ' + ', '.join(moved))

        best = tails.get(BEST, {}) if BEST not in later else {}
        if best.get('metric') is not None and best.get('epoch') is not None:
            self.best = (float(best['metric']), int(best['epoch']))
        elif self.kept:
            self.best = self.kept[0]
            if not os.path.exists(self.path(BEST)):
                source = self.path(f'checkpoint-{self.best[1]}.pth.tar')
                models.save_checkpoint_file(models.load_checkpoint_file(source, mmap=True), self.path(BEST))
                _logger.warning(f'{self.path(BEST)} re-created from {source}, the best epoch kept.')

    def _supersede(self, name: str) -> str:
        """Move `name` into superseded/; returns what was moved where."""
        target = superseded_path(self.output_dir, name)
        os.rename(self.path(name), target)
        moved = os.path.basename(target)
        return name if moved == name else f'{name} (as {moved})'

    def save(self, state: Dict[str, Any]) -> bool:
        """Write the epoch's files; True when it is the new best."""
        metric, epoch = state['metric'], state['epoch']
        is_best = False
        if metric is not None:
            entries = self._rank([e for e in self.kept if e[1] != epoch] + [(float(metric), epoch)])
            if self.history and (metric, epoch) in entries[:self.history]:
                models.save_checkpoint_file(state, self.path(f'checkpoint-{epoch}.pth.tar'))
            for _, dropped in entries[self.history:]:
                stale = self.path(f'checkpoint-{dropped}.pth.tar')
                if os.path.exists(stale):
                    os.remove(stale)
            self.kept = entries[:self.history]
            is_best = self.best is None or self._better(metric, self.best[0])
            if is_best:
                models.save_checkpoint_file(state, self.path(BEST))
                self.best = (float(metric), epoch)
        models.save_checkpoint_file(state, self.path(LAST))
        return is_best


def read_resumable(path: str, mmap: bool = False) -> Dict[str, Any]:
    """The checkpoint at `path` if this project's train.py wrote it; CheckpointError otherwise.

    The authors' released checkpoints have the same `version` and an optimizer too, so the keys that only
    this train.py writes tell the two apart."""
    checkpoint = models.load_checkpoint_file(path, mmap=mmap)
    if not isinstance(checkpoint, dict) or checkpoint.get('version') != FORMAT_VERSION \
            or not TRAINING_KEYS <= set(checkpoint) or not isinstance(checkpoint['optimizer'], dict) \
            or not isinstance(checkpoint['args'], dict):
        raise CheckpointError(
            f'{path} is not a training checkpoint written by this project\'s train.py (it needs '
            f'{", ".join(sorted(TRAINING_KEYS))} and version {FORMAT_VERSION}), so training cannot resume from it. '
            f'To start a new run from its weights, pass it as --initial-checkpoint instead.')
    return checkpoint


def resume_point(path: str) -> Tuple[int, Dict[str, Any]]:
    """The last finished epoch and the recorded options of the checkpoint to resume from; mapped, not read,
    since the run checks them before it builds anything."""
    checkpoint = read_resumable(path, mmap=True)
    return int(checkpoint['epoch']), checkpoint['args']


def _class_names(class_to_idx: dict, shown: int = 4) -> str:
    names = sorted(class_to_idx, key=class_to_idx.get)
    return ', '.join(names[:shown]) + (f' ... ({len(names)} in all)' if len(names) > shown else '')


def check_resumed_classes(path: str, data: str, class_to_idx: Optional[dict]):
    """Refuse to resume on data whose classes are not the ones the checkpoint at `path` learned, label for label:
    its head would carry on under other names. Checkpoints or datasets without a class map are not checked."""
    recorded = read_resumable(path, mmap=True).get('class_to_idx')
    if recorded is None or class_to_idx is None or dict(recorded) == dict(class_to_idx):
        return
    raise CheckpointError(
        f'--resume {path} was trained on the classes {_class_names(recorded)}, but {data} labels '
        f'{_class_names(class_to_idx)}: its head would go on under other names. Resume on the data it was trained '
        f'on, or start a new run from its weights with --initial-checkpoint {path} to fine-tune.')


def _resume_loss_scaler(path: str, state: Optional[dict], loss_scaler):
    """Load the scaler's state when the checkpoint has one of its kind; a run resumed with another kind of AMP
    (apex, native float16) starts its scaler fresh, since each kind's state fails to load into the other."""
    if state is None:
        _logger.warning(f'{path} has no loss-scaler state (it was trained without a scaler: float32 or bfloat16); '
                        f'the scaler starts fresh.')
    elif scaler_state_kind(state) != scaler_kind(loss_scaler):
        _logger.warning(f'{path} holds the loss-scaler state of {scaler_state_kind(state)}, and this run uses '
                        f'{scaler_kind(loss_scaler)}: the scaler starts fresh (a few first updates may be skipped '
                        f'while its loss scale settles).')
    else:
        loss_scaler.load_state_dict(state)


def resume_training(path: str, model, optimizer, scheduler=None, loss_scaler=None, model_ema=None,
                    global_batch: Optional[int] = None) -> int:
    """Restore model, optimizer, loss scaler and EMA from a checkpoint of this project's train.py; returns
    the epoch to continue with. Given this run's global batch, warns when the resumed run's was another.

    The schedule is not restored: like timm's train.py, the caller steps the scheduler it built from this
    run's options to the resumed epoch, so a larger --epochs extends a run. Only the plateau schedule keeps
    state that no option gives (the best metric so far), and it is restored."""
    checkpoint = read_resumable(path)
    if model_ema is None and isinstance(checkpoint.get('state_dict_ema'), dict):
        raise CheckpointError(
            f'{path} holds EMA weights, but this run has no --model-ema: resuming would drop the EMA history, and '
            f'the next last.pth.tar would be written without it. Add --model-ema (with the run\'s '
            f'--model-ema-decay), or resume with the run\'s own options: '
            f'-c {os.path.join(os.path.dirname(path), "args.yaml")}.')
    if loss_scaler is None and checkpoint.get('scaler') is not None:
        _logger.warning(f'{path} holds loss-scaler state (the run used float16 AMP or apex), but this run has no loss '
                        f'scaler (no --amp, or bfloat16): its state is dropped and the next checkpoints are written '
                        f'without it. Add --amp (--amp-dtype float16) to continue the run as it was.')
    recorded_batch = checkpoint.get('global_batch')
    if global_batch is not None and recorded_batch is not None and recorded_batch != global_batch:
        _logger.warning(f'{path} was trained with a global batch of {recorded_batch} images per update, and this run '
                        f'has {global_batch} (-b x processes x --grad-accum-steps); the learning rate is not rescaled. '
                        f'To continue the run as it was, make them equal.')
    models.load_weights(unwrap_model(model), checkpoint['state_dict'], f'{path} (state_dict)')
    optimizer.load_state_dict(checkpoint['optimizer'])
    if isinstance(scheduler, PlateauLRScheduler) and checkpoint['scheduler'] is not None:
        scheduler.load_state_dict(checkpoint['scheduler'])
    if loss_scaler is not None:
        _resume_loss_scaler(path, checkpoint.get('scaler'), loss_scaler)
    if model_ema is not None:
        if isinstance(checkpoint.get('state_dict_ema'), dict):
            models.load_weights(model_ema.module, checkpoint['state_dict_ema'], f'{path} (state_dict_ema)')
        else:
            _logger.warning(f'{path} has no EMA weights; the EMA restarts from the resumed weights.')
            model_ema.set(unwrap_model(model))
    start_epoch = int(checkpoint['epoch']) + 1
    _logger.info(f'Resumed from {path}: epoch {checkpoint["epoch"]} was finished, continuing with epoch {start_epoch}.')
    return start_epoch
