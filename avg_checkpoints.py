#!/usr/bin/env python3
"""Average the weights of a run's best checkpoints into one weights file.

    python avg_checkpoints.py --input output/train/RUN -n 5 --output averaged.pth
    python avg_checkpoints.py --input output/train/RUN --filter 'checkpoint-*.pth.tar' --no-sort --safetensors

As timm's avg_checkpoints.py: the files in --input matching --filter are ranked by the metric they
record (the run's --eval-metric; lower is better for a loss), and the best -n are averaged, EMA
weights when they have them (--no-use-ema for the live ones); --no-sort averages every match. A
file that repeats an epoch of the same run (model_best.pth.tar and last.pth.tar are copies of
checkpoint-N.pth.tar files) is counted once. Averaging only makes sense for checkpoints of one run.
The output keeps the model name and arguments, class map and input options of the best checkpoint.
"""
import argparse
import glob
import logging
import os
import sys
from dataclasses import dataclass
from typing import List, Optional


import utils.offline  # noqa: F401  (first: the hub client reads its switches when timm imports it)

import torch

import models
from utils.args import DefaultsHelpFormatter
from utils.distributed import run_script
from utils.errors import CheckpointError, OutputError
from utils.outputs import setup_logging
from utils.option_checks import at_least
from utils.weights_choice import add_weights_choice
from utils.weights_files import loading_hint, output_suffix, split_suffix, weights_content, write_weights_file

_logger = logging.getLogger('avg_checkpoints')

DEFAULT_OUTPUT = 'averaged'


def avg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='avg_checkpoints.py', description=__doc__.split('\n\n')[0],
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument('--input', default='', metavar='DIR', help='folder holding the checkpoints')
    parser.add_argument('--filter', default='*.pth.tar', metavar='WILDCARD',
                        help="checkpoints to consider, a wildcard under --input ('**' goes into subfolders)")
    parser.add_argument('--output', default='', metavar='PATH',
                        help=f'output file (default: ./{DEFAULT_OUTPUT}.pth, or .safetensors with --safetensors)')
    add_weights_choice(parser, 'average', 'every checkpoint has')
    parser.add_argument('--no-sort', action='store_true',
                        help='average every match, ranked or not (-n does not apply)')
    parser.add_argument('-n', type=at_least(1), default=10, metavar='N', help='number of best checkpoints to average')
    parser.add_argument('--safetensors', action='store_true', help='write safetensors instead of a torch pickle')
    return parser


@dataclass
class Candidate:
    path: str
    epoch: Optional[int]
    metric: Optional[float]
    eval_metric: str  # what `metric` measures


def read_candidate(path: str) -> Candidate:
    """A checkpoint's epoch and ranking metric, read without loading its tensors."""
    checkpoint = models.load_checkpoint_file(path, mmap=True)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'{path} is not a checkpoint (a dict of weights and data).')
    options = checkpoint.get('args')
    options = vars(options) if isinstance(options, argparse.Namespace) else dict(options or {})
    return Candidate(path, checkpoint.get('epoch'), checkpoint.get('metric'), options.get('eval_metric') or 'top1')


def same_weights(path: str, other: str, use_ema: Optional[bool]) -> bool:
    first, second = (models.read_checkpoint(p, use_ema=use_ema).state_dict for p in (path, other))
    return first.keys() == second.keys() and all(torch.equal(v, second[k]) for k, v in first.items())


def without_repeats(candidates: List[Candidate], use_ema: Optional[bool]) -> List[Candidate]:
    """One file per epoch of a run: model_best and last are copies of an epoch's checkpoint in the same folder.
    Files of one folder with the same epoch and metric are copies only when their weights are the same (two runs
    may well both reach 50% at epoch 0)."""
    kept, seen = [], {}
    for candidate in candidates:
        if candidate.epoch is None:
            kept.append(candidate)
            continue
        key = (os.path.realpath(os.path.dirname(candidate.path)), candidate.epoch, candidate.metric)
        original = next((p for p in seen.get(key, []) if same_weights(candidate.path, p, use_ema)), None)
        if original:
            _logger.info(f'Left out {candidate.path}: a copy of {original} (epoch {candidate.epoch}).')
            continue
        seen.setdefault(key, []).append(candidate.path)
        kept.append(candidate)
    return kept


def best_candidates(candidates: List[Candidate], count: int) -> List[Candidate]:
    """The `count` best by recorded metric; files without one are left out, with a warning."""
    unranked = [c.path for c in candidates if c.metric is None]
    if unranked:
        _logger.warning(f'Left out {len(unranked)} file(s) that record no metric to rank by: {", ".join(unranked)} '
                        f'(--no-sort averages every match).')
    ranked = [c for c in candidates if c.metric is not None]
    measures = sorted({c.eval_metric for c in ranked})
    if len(measures) > 1:
        raise CheckpointError(f'the checkpoints are ranked by different metrics ({", ".join(measures)}), so they are '
                              f'not from one run; narrow --input/--filter to one run, or pass --no-sort.')
    lower_is_better = bool(measures) and 'loss' in measures[0]
    return sorted(ranked, key=lambda c: c.metric, reverse=not lower_is_better)[:count]


def average(paths: List[str], use_ema: Optional[bool]) -> tuple:
    """(first checkpoint read, averaged state dict). Floating tensors are averaged in float64 and given back
    their type; others (BatchNorm's batch counters) are the first checkpoint's."""
    first, total = None, {}
    for path in paths:
        loaded = models.read_checkpoint(path, use_ema=use_ema)
        if first is None:
            first = loaded
            total = {k: v.double() if v.is_floating_point() else v for k, v in loaded.state_dict.items()}
            continue
        if loaded.model_name != first.model_name:
            raise CheckpointError(f'{path} is a {loaded.model_name} checkpoint but {first.path} a {first.model_name}: '
                                  f'only checkpoints of one model can be averaged; narrow --input/--filter to one run.')
        if loaded.class_to_idx != first.class_to_idx:
            raise CheckpointError(f'{path} and {first.path} map class names to other labels (their class_to_idx '
                                  f'differ), so they were trained on other data; narrow --input/--filter to one run.')
        if loaded.weights != first.weights:
            raise CheckpointError(
                f'{path} gives its {loaded.weights} but {first.path} its {first.weights}: some checkpoints have '
                f'EMA weights and some not. Pass --no-use-ema to average the live weights of all.')
        shapes = {k: v.shape for k, v in loaded.state_dict.items()}
        expected = {k: v.shape for k, v in total.items()}
        if shapes != expected:
            differing = sorted(set(shapes.items()) ^ set(expected.items()))[:3]
            raise CheckpointError(f'{path} has other weights than {first.path} (e.g. {differing}): only checkpoints of '
                                  f'one model can be averaged; narrow --input/--filter to one run.')
        for k, v in loaded.state_dict.items():
            if v.is_floating_point():
                total[k] += v.double()
    state_dict = {k: (v / len(paths)).to(first.state_dict[k].dtype) if v.is_floating_point() else v
                  for k, v in total.items()}
    return first, state_dict


def output_path(args) -> str:
    target = args.output or DEFAULT_OUTPUT
    return split_suffix(target)[0] + output_suffix('--output', target, args.safetensors)


def average_checkpoints(args) -> str:
    path = output_path(args)
    if os.path.exists(path):
        raise CheckpointError(f'{path} already exists; remove it or choose another --output (nothing is overwritten).')
    pattern = os.path.join(args.input, args.filter)
    matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not matches:
        raise CheckpointError(f'no checkpoints match {pattern}; check --input and --filter.')
    candidates = without_repeats([read_candidate(p) for p in matches], args.use_ema)
    selected = candidates if args.no_sort else best_candidates(candidates, args.n)
    if not selected:
        raise CheckpointError(f'none of the {len(candidates)} checkpoints matching {pattern} can be ranked; '
                              f'pass --no-sort to average them all.')
    _logger.info('Averaging:\n' + '\n'.join(
        f'  {c.path}  epoch {c.epoch}  {c.eval_metric} {c.metric}' for c in selected))
    first, state_dict = average([c.path for c in selected], args.use_ema)
    sources = [dict(file=os.path.basename(c.path), epoch=c.epoch, metric=c.metric) for c in selected]
    content = weights_content(first, state_dict, averaged_from=sources)
    final, sha256 = write_weights_file(content, path, hash_in_name=False)
    _logger.info(f'Averaged the {first.weights} of {len(selected)} checkpoint(s) into {final}, SHA256 {sha256}')
    _logger.info(f'Load it with {loading_hint(final, content)}.')
    return final


def main(argv=None) -> int:
    parser = avg_parser()
    args = parser.parse_args(argv)
    setup_logging(None, True)
    return run_script(average_checkpoints, args, (CheckpointError, OutputError), _logger)


if __name__ == '__main__':
    sys.exit(main())
