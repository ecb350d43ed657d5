#!/usr/bin/env python3
"""Strip a training checkpoint to one set of weights for release, named with its SHA-256.

    python clean_checkpoint.py --checkpoint output/train/RUN/model_best.pth.tar --output posmlp_t.pth
    python clean_checkpoint.py --checkpoint output/train/RUN/model_best.pth.tar --safetensors

As timm's clean_checkpoint.py: the EMA weights when the checkpoint has them (--no-use-ema for the
live ones), on the CPU, without optimizer, scheduler or scaler state, written as STEM-<sha256[:8]>.pth
(or .safetensors). The file also keeps the model name and arguments, the class map and the input
options of the run, so `models.create_model_from_checkpoint` rebuilds the model from it alone.
"""
import argparse
import logging
import os
import sys

import utils.offline  # noqa: F401  (first: the hub client reads its switches when timm imports it)

import models
from utils.args import DefaultsHelpFormatter
from utils.distributed import run_script
from utils.errors import CheckpointError, OutputError
from utils.outputs import setup_logging
from utils.weights_choice import add_weights_choice
from utils.weights_files import loading_hint, output_suffix, split_suffix, weights_content, write_weights_file

_logger = logging.getLogger('clean_checkpoint')


def clean_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='clean_checkpoint.py', description=__doc__.split('\n\n')[0],
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument('--checkpoint', required=True, metavar='PATH',
                        help="a checkpoint of this project's train.py, the authors' release or timm's train.py")
    parser.add_argument('--output', default='', metavar='PATH',
                        help='output file, or a folder for the checkpoint\'s name; the hash goes before its ending '
                             '(default: the checkpoint\'s name, in the current folder)')
    add_weights_choice(parser)
    parser.add_argument('--no-hash', action='store_true', help='leave the SHA-256 out of the file name')
    parser.add_argument('--clean-aux-bn', action='store_true',
                        help="drop the auxiliary BatchNorm weights of timm's --split-bn training (keys holding "
                             "'aux_bn'), so the weights load into the plain model")
    parser.add_argument('--safetensors', action='store_true', help='write safetensors instead of a torch pickle')
    return parser


def output_path(args) -> str:
    """The file to write before the hash goes into its name: --output, else the checkpoint's stem, here or in
    the folder --output names."""
    checkpoint_stem = split_suffix(os.path.basename(args.checkpoint))[0]
    target = args.output or checkpoint_stem
    if args.output.endswith(os.sep) or os.path.isdir(args.output):
        target = os.path.join(args.output, checkpoint_stem)
    stem, _ = split_suffix(target)
    return stem + output_suffix('--output', target, args.safetensors)


def clean(args) -> str:
    path = output_path(args)
    loaded = models.read_checkpoint(args.checkpoint, use_ema=args.use_ema)
    state_dict = {k: v.detach().cpu() for k, v in loaded.state_dict.items()}
    if args.clean_aux_bn:
        state_dict = {k: v for k, v in state_dict.items() if 'aux_bn' not in k}
        _logger.info(f'--clean-aux-bn: dropped {len(loaded.state_dict) - len(state_dict)} auxiliary BatchNorm '
                     f'tensors.')
    content = weights_content(loaded, state_dict, epoch=loaded.epoch)
    final, sha256 = write_weights_file(content, path, hash_in_name=not args.no_hash)
    _logger.info(f'{loaded.weights} of {args.checkpoint} ({len(state_dict)} tensors) saved to {final}, '
                 f'SHA256 {sha256}')
    _logger.info(f'Load it with {loading_hint(final, content)}.')
    return final


def main(argv=None) -> int:
    args = clean_parser().parse_args(argv)
    setup_logging(None, True)
    return run_script(clean, args, (CheckpointError, OutputError), _logger)


if __name__ == '__main__':
    sys.exit(main())
