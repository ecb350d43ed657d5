#!/usr/bin/env python3
"""Export a model to ONNX, from a checkpoint or a timm model name, with timm's onnx_export.

    python onnx_export.py posmlp_t.onnx --checkpoint output/train/RUN/model_best.pth.tar --reparam --check-forward
    python onnx_export.py resmlp.onnx --model resmlp_12_224 --no-dynamo

As timm's onnx_export.py: the graph takes any batch size (and with --dynamic-size any input size the
model's graph allows), `--reparam` fuses the model for inference first (timm's reparameterize_model),
`--check-forward` runs the graph with onnxruntime and compares it with PyTorch. A checkpoint
describes its model, so --model is needed only without one (random weights). The exporter is
torch.onnx.export's default (torch.export based, `dynamo=True` since torch 2.9); --no-dynamo uses
the TorchScript exporter, several times faster to export on a CPU. PosMLP is exported in its fast
(channel-major) form, with plain operations: the graph computes what the eager model computes.
onnx and onnxruntime are needed here only: pip install onnx onnxruntime onnxscript.
"""
import argparse
import utils.offline  # noqa: F401  (first: the hub client reads its switches when timm imports it)

import inspect
import logging
import os
import shutil
import sys
import tempfile

import timm
import torch
from timm.utils import reparameterize_model

import models
from models.checkpoint import os_error_behind
from utils.args import DefaultsHelpFormatter, ModelKwargs
from utils.data import given_input_options, resolve_input_config
from utils.distributed import run_script
from utils.errors import CheckpointError, OptionError, OutputError
from utils.option_checks import at_least, model_name_problem
from utils.outputs import output_error, setup_logging
from utils.weights_choice import add_weights_choice

_logger = logging.getLogger('onnx_export')

# What torch.onnx.export uses when not told (True, the torch.export based exporter, since torch 2.9).
DYNAMO_DEFAULT = inspect.signature(torch.onnx.export).parameters['dynamo'].default is True
EXPORT_PACKAGES = ('onnx', 'onnxruntime', 'onnxscript')
# The opsets each exporter writes, by --dynamo, as torch 2.14 defines them in private modules (not imported, as
# private names move; tests/test_onnx.py checks these against them): torch.export's operators start at 18 (asked
# for less, it exports 18 and tries onnx's version converter, which fails on this model's ops); TorchScript's end
# at 20.
OPSETS = {True: (18, 23), False: (7, 20)}
# Loggers of the dynamo exporter's graph optimizer, which reports each rewrite at INFO.
EXPORTER_LOGGERS = ('onnxscript', 'onnx_ir')


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='onnx_export.py', description=__doc__.split('\n\n')[0],
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument('output', metavar='ONNX_FILE', help='the .onnx file to write (it must not exist)')
    parser.add_argument('--checkpoint', default='', metavar='PATH',
                        help="a checkpoint of this project's train.py, a cleaned or averaged one, or the authors'")
    add_weights_choice(parser, 'export')
    parser.add_argument('--model', '-m', default=None,
                        help='timm model name (default: the one the checkpoint describes; without a checkpoint, '
                             'the model is exported with random weights)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ModelKwargs, metavar='KEY=VALUE',
                        help='more model arguments, values as Python literals')
    parser.add_argument('--num-classes', type=at_least(1), default=None,
                        help='classes of a model built without a checkpoint')
    parser.add_argument('--opset', type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument('--dynamic-size', action='store_true',
                        help='input height and width as graph inputs too, not only the batch size')
    parser.add_argument('--check-forward', action='store_true',
                        help='run the graph with onnxruntime on random input and compare it with PyTorch')
    parser.add_argument('--check-atol', type=float, default=1e-4,
                        help='largest absolute difference --check-forward accepts')
    parser.add_argument('-b', '--batch-size', type=at_least(1), default=2, help='batch size of the example input')
    parser.add_argument('--img-size', type=at_least(1), default=None, help='input image size (default: the model\'s)')
    parser.add_argument('--input-size', type=at_least(1), nargs=3, default=None, metavar=('C', 'H', 'W'),
                        help='input size')
    parser.add_argument('--reparam', action='store_true', help="fuse the model for inference first (timm's "
                                                               "reparameterize_model)")
    parser.add_argument('--dynamo', action=argparse.BooleanOptionalAction, default=DYNAMO_DEFAULT,
                        help="torch.export based exporter; --no-dynamo: the TorchScript exporter "
                             "(default: torch.onnx.export's)")
    parser.add_argument('--verbose', action='store_true', help="the exporter's own output")
    return parser


def build_model(args):
    if args.checkpoint:
        return models.create_model_from_checkpoint(args.checkpoint, model_name=args.model, use_ema=args.use_ema,
                                                   **args.model_kwargs)
    _logger.warning(f'No --checkpoint: exporting {args.model} with random weights.')
    kwargs = dict(args.model_kwargs, **({'num_classes': args.num_classes} if args.num_classes else {}))
    try:
        return timm.create_model(args.model, **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise OptionError(f'cannot build {args.model} with {kwargs}: {e}. Check --model-kwargs.') from None


def example_input(args, model) -> torch.Tensor:
    input_size = resolve_input_config(given_input_options(args), model)['input_size']
    return torch.randn((args.batch_size, *input_size), generator=torch.Generator().manual_seed(0))


def check_forward(path: str, model, example: torch.Tensor, atol: float):
    """Run the graph with onnxruntime on the example and on one more image than it holds (the batch is a
    graph input); raise when any logit differs from PyTorch's by more than `atol`."""
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    inputs = torch.cat([example, torch.randn(example[:1].shape, generator=torch.Generator().manual_seed(1))])
    with torch.inference_mode():
        expected = model(inputs).float().numpy()
    got = session.run(None, {name: inputs.numpy()})[0]
    difference = float(abs(got - expected).max())
    if difference > atol:
        raise OptionError(f'--check-forward: onnxruntime gives logits up to {difference:.3g} away from PyTorch\'s, '
                          f'more than --check-atol {atol:g}; the graph is not the model. Try --no-dynamo, or '
                          f'another --opset.')
    _logger.info(f'--check-forward: onnxruntime matches PyTorch on {len(inputs)} images, largest logit difference '
                 f'{difference:.3g}.')


def run_exporter(args, model, example: torch.Tensor, path: str):
    """timm's onnx_export, with onnx's checker; a model the exporter cannot take is named in one line
    (--verbose shows the exporter's whole error)."""
    from timm.utils.onnx import onnx_export
    if not args.verbose:
        for name in EXPORTER_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        onnx_export(model, path, example_input=example, opset=args.opset, dynamic_size=args.dynamic_size,
                    use_dynamo=args.dynamo, verbose=args.verbose, check=True, check_forward=False)
    except Exception as e:
        if args.verbose or os_error_behind(e) is not None:
            raise  # an OSError is the output's problem, not the exporter's (see export)
        exporter, other = ('torch.export (dynamo)', '--no-dynamo') if args.dynamo else ('TorchScript', '--dynamo')
        reason = (str(e).strip().splitlines() or [''])[0]
        raise OptionError(f'the {exporter} exporter failed on {model.pretrained_cfg["architecture"]}: '
                          f'{type(e).__name__}: {reason} (--verbose shows the whole error; {other} uses the other '
                          f'exporter, --opset another opset).') from None


def export(args):
    output = os.path.abspath(args.output)
    if os.path.lexists(output):
        raise OptionError(f'{args.output} already exists; remove it or choose another file (nothing is overwritten).')
    model = build_model(args).eval()
    if args.reparam:
        model = reparameterize_model(model, inplace=True)
    example = example_input(args, model)
    try:
        write_export(args, model, example, output)
    except Exception as e:
        cause = os_error_behind(e)
        if cause is None:
            raise
        raise output_error(OSError(cause.errno, cause.strerror), args.output, 'ONNX_FILE') from None
    exporter = 'torch.export (dynamo)' if args.dynamo else 'TorchScript'
    _logger.info(f'Exported {model.pretrained_cfg["architecture"]} to {args.output} ({exporter} exporter, input '
                 f'{tuple(example.shape[1:])}, batch{" and size" if args.dynamic_size else ""} dynamic).')


def write_export(args, model, example: torch.Tensor, output: str):
    """Export to `output` (and check it), through a hidden folder beside it, then moved: a failed export leaves
    nothing (the weights of a model over 2 GB go to a .data file that the graph names, which moves with it)."""
    os.makedirs(os.path.dirname(output), exist_ok=True)
    partial = tempfile.mkdtemp(prefix='.partial-onnx-', dir=os.path.dirname(output))
    try:
        path = os.path.join(partial, os.path.basename(output))
        run_exporter(args, model, example, path)
        if args.check_forward:
            check_forward(path, model, example, args.check_atol)
        for name in os.listdir(partial):
            os.replace(os.path.join(partial, name), os.path.join(os.path.dirname(output), name))
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def check_options(parser, args):
    missing = [name for name in EXPORT_PACKAGES if not _importable(name) and (name != 'onnxscript' or args.dynamo)]
    if missing:
        parser.error(f'the ONNX export needs {", ".join(missing)}: pip install {" ".join(missing)} '
                     f'(requirements-dev.txt has them).')
    if not args.checkpoint and not args.model:
        parser.error('give --checkpoint (its model is exported) or --model (exported with random weights).')
    if args.opset is not None:
        low, high = OPSETS[args.dynamo]
        if not low <= args.opset <= high:
            other_low, other_high = OPSETS[not args.dynamo]
            parser.error(f'--opset {args.opset}: the {"torch.export" if args.dynamo else "TorchScript"} exporter '
                         f'writes opsets {low} to {high}; pass one of those, or '
                         f'{"--no-dynamo" if args.dynamo else "--dynamo"} for opsets {other_low} to {other_high}.')
    problem = model_name_problem(args.model) if args.model else None
    if problem:
        parser.error(f'--model {args.model}: {problem}')


def _importable(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def main(argv=None) -> int:
    parser = export_parser()
    args = parser.parse_args(argv)
    check_options(parser, args)
    setup_logging(None, True)
    return run_script(export, args, (CheckpointError, OptionError, OutputError), _logger)


if __name__ == '__main__':
    sys.exit(main())
