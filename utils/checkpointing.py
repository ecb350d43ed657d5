"""Training checkpoints: what they hold, the files kept in the output folder, and resuming from them.

Every epoch writes `checkpoint-<epoch>.pth.tar` while it ranks among the best `history` epochs,
`model_best.pth.tar` when it is the best so far, and `last.pth.tar`, in that order and each through
`models.save_checkpoint_file` (temporary file + rename): a crash at any point leaves every file
whole, and `last.pth.tar` is never ahead of the others.
"""
import glob
import logging
import os
import re
from typing import Any, Dict, List, Optional, Tuple

from timm.utils import get_state_dict, unwrap_model

import models
from models import CheckpointError

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
LAST = 'last.pth.tar'
BEST = 'model_best.pth.tar'
HISTORY_PATTERN = re.compile(r'checkpoint-(\d+)\.pth\.tar$')


def training_state(epoch: int, model_name: str, model_kwargs: dict, model, optimizer, scheduler, loss_scaler,
                   model_ema, args: dict, metric: Optional[float]) -> Dict[str, Any]:
    """The checkpoint of an epoch just finished, as plain data (loads with weights_only=True)."""
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
    if model_ema is not None:
        state['state_dict_ema'] = get_state_dict(model_ema.module, unwrap_model)
    return state


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
        """Pick up the history and best of a resumed run from the files it left (epochs up to the resumed one)."""
        entries = []
        for path in glob.glob(self.path('checkpoint-*.pth.tar')):
            match = HISTORY_PATTERN.search(os.path.basename(path))
            if not match or int(match.group(1)) > resumed_epoch:
                continue
            metric = models.load_checkpoint_file(path).get('metric')
            if metric is not None:
                entries.append((float(metric), int(match.group(1))))
        self.kept = self._rank(entries)
        best = models.load_checkpoint_file(self.path(BEST)) if os.path.isfile(self.path(BEST)) else {}
        if best.get('metric') is not None and best.get('epoch', resumed_epoch + 1) <= resumed_epoch:
            self.best = (float(best['metric']), int(best['epoch']))
        elif self.kept:
            self.best = self.kept[0]

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


def resume_training(path: str, model, optimizer, scheduler=None, loss_scaler=None, model_ema=None) -> int:
    """Restore model, optimizer, scheduler, loss scaler and EMA from a checkpoint of this project's
    train.py; returns the epoch to continue with."""
    checkpoint = models.load_checkpoint_file(path)
    if not isinstance(checkpoint, dict) or checkpoint.get('version') != FORMAT_VERSION \
            or not isinstance(checkpoint.get('optimizer'), dict) or 'epoch' not in checkpoint:
        raise CheckpointError(
            f'{path} is not a training checkpoint written by this project\'s train.py (it needs epoch, optimizer '
            f'and version {FORMAT_VERSION}), so training cannot resume from it. To start a new run from its '
            f'weights, pass it as --initial-checkpoint instead.')
    models.load_weights(unwrap_model(model), checkpoint['state_dict'], f'{path} (state_dict)')
    optimizer.load_state_dict(checkpoint['optimizer'])
    if scheduler is not None and checkpoint.get('scheduler') is not None:
        scheduler.load_state_dict(checkpoint['scheduler'])
    if loss_scaler is not None:
        if checkpoint.get('scaler') is not None:
            loss_scaler.load_state_dict(checkpoint['scaler'])
        else:
            _logger.warning(f'{path} has no loss-scaler state (it was trained without AMP); the scaler starts fresh.')
    if model_ema is not None:
        if isinstance(checkpoint.get('state_dict_ema'), dict):
            models.load_weights(model_ema.module, checkpoint['state_dict_ema'], f'{path} (state_dict_ema)')
        else:
            _logger.warning(f'{path} has no EMA weights; the EMA restarts from the resumed weights.')
            model_ema.set(unwrap_model(model))
    start_epoch = int(checkpoint['epoch']) + 1
    _logger.info(f'Resumed from {path}: epoch {checkpoint["epoch"]} was finished, continuing with epoch {start_epoch}.')
    return start_epoch
