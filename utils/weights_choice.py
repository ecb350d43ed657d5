"""EMA or live weights: which of a checkpoint's weights are used, and which model ranks a run's checkpoints.

A run with --model-ema keeps two sets of weights: the live ones the optimizer updates (`state_dict`) and
their exponential moving average (`state_dict_ema`; `model_ema` in some other trainers' checkpoints).
Every reader of a checkpoint takes the EMA weights when it has them, as timm and the authors' evaluation
do: `use_ema` None. The scripts' --use-ema (True) requires them, --no-use-ema / --no-ema (False) takes the
live ones. Training ranks its checkpoints (model_best.pth.tar) by the EMA model whenever it keeps one, so
the weights ranked best are the ones evaluated by default; --no-best-from-ema ranks by the live model.
"""
import argparse
import logging
from typing import Any, Dict, Optional, Tuple

import torch
from timm.models import clean_state_dict

from .errors import CheckpointError

EMA_KEYS = ('state_dict_ema', 'model_ema')
LIVE_KEYS = ('state_dict', 'model')
WEIGHT_KEYS = EMA_KEYS + LIVE_KEYS  # most preferred first

_logger = logging.getLogger(__name__)


def select_state_dict(checkpoint: Any, use_ema: Optional[bool] = None) -> Tuple[Dict[str, torch.Tensor], str]:
    """(state_dict, the key it came from) of a checkpoint: its EMA weights when present unless use_ema is
    False, else its live ones; a bare state dict is its own live weights ('state_dict')."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'a checkpoint must be a dict, got {type(checkpoint).__name__}.')
    ema_key = next((k for k in EMA_KEYS if isinstance(checkpoint.get(k), dict)), None)
    live_key = next((k for k in LIVE_KEYS if isinstance(checkpoint.get(k), dict)), None)
    if use_ema and ema_key is None:
        raise CheckpointError('EMA weights were asked for, but the checkpoint has none (no state_dict_ema); '
                              'use its live weights with use_ema=None or False (validate.py: leave out --use-ema).')
    if ema_key is not None and use_ema is not False:
        return checkpoint[ema_key], ema_key
    if live_key is not None:
        return checkpoint[live_key], live_key
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint, 'state_dict'
    raise CheckpointError(f'no weights found in the checkpoint (keys: {sorted(checkpoint)[:10]}).')


def training_weights(checkpoint: dict, model: Optional[torch.nn.Module] = None) -> Dict[str, torch.Tensor]:
    """For the checkpoint filters of timm's pretrained route: the preferred weights of a whole training
    checkpoint, or a state dict as given; either way without the `module.` / `_orig_mod.` prefixes that DDP
    and torch.compile add. Given the model, warns when timm is about to drop a head that fits it."""
    key = next((k for k in WEIGHT_KEYS if isinstance(checkpoint.get(k), dict)), None)
    state_dict = clean_state_dict(checkpoint[key] if key else checkpoint)
    if model is not None:
        warn_if_a_fitting_head_is_dropped(state_dict, model)
    return state_dict


def warn_if_a_fitting_head_is_dropped(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module):
    """timm's pretrained route discards the file's classifier whenever the model's class count differs from
    its pretrained_cfg's, even when the file's head has the model's class count: a trained head would be
    replaced by a random one with only an INFO line, which a notebook does not show."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    classifier, num_classes = cfg.get('classifier'), getattr(model, 'num_classes', None)
    weight = state_dict.get(f'{classifier}.weight') if isinstance(classifier, str) else None
    if weight is not None and weight.shape[0] == num_classes != cfg.get('num_classes'):
        _logger.warning(f'The file\'s {num_classes}-class head fits the model, but timm drops it (and the model '
                        f'gets a random head) because pretrained_cfg says num_classes={cfg.get("num_classes")}; '
                        f'put num_classes={num_classes} in pretrained_cfg_overlay to keep it.')


def is_ema(key: str) -> bool:
    return key in EMA_KEYS


def describe_weights(key: str, use_ema: Optional[bool]) -> str:
    """Which weights a script used, for its output: 'EMA weights (state_dict_ema)', 'live weights (state_dict)'."""
    if is_ema(key):
        return f'EMA weights ({key})'
    return f'live weights ({key})' + ('' if use_ema is False else '; the checkpoint has no EMA weights')


def add_weights_choice(parser: argparse.ArgumentParser, what: str = 'use', every: str = 'the checkpoint has'):
    """--use-ema / --no-use-ema (--no-ema) of the scripts that read a checkpoint; `use_ema` is None, True or
    False, as `select_state_dict` takes it."""
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument('--use-ema', action='store_true', default=None,
                         help=f'require the EMA weights (default: EMA when {every} them)')
    weights.add_argument('--no-use-ema', '--no-ema', dest='use_ema', action='store_false', default=argparse.SUPPRESS,
                         help=f'{what} the live (non-EMA) weights')


def resolve_best_from_ema(parser: argparse.ArgumentParser, args: argparse.Namespace, config: Dict[str, Any]):
    """Rank checkpoints by the EMA model whenever there is one, unless --no-best-from-ema (or the config's
    best_from_ema: false) says otherwise; --best-from-ema on the command line without EMA is an error."""
    if args.best_from_ema is None:
        args.best_from_ema = args.model_ema and config.get('best_from_ema') is not False
    elif args.best_from_ema and not args.model_ema:
        parser.error('--best-from-ema ranks checkpoints by the EMA model, so it needs --model-ema.')


def ranked_by(args: argparse.Namespace) -> str:
    """What ranks a run's checkpoints, as its log names it: 'EMA top1', 'eval loss'."""
    return f'{"EMA" if args.best_from_ema else "eval"} {args.eval_metric}'


def ranking_metric(args: argparse.Namespace, eval_metrics: dict, ema_metrics: Optional[dict]) -> float:
    """The epoch's value of --eval-metric for the model that ranks the checkpoints."""
    return (ema_metrics if args.best_from_ema else eval_metrics)[args.eval_metric]
