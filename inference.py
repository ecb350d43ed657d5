#!/usr/bin/env python3
"""Predict the top-k classes of images with a checkpoint: a folder, a file list or a single image.

    python inference.py path/to/images --checkpoint output/train/RUN/model_best.pth.tar --topk 5
    python inference.py images.txt --checkpoint posmlp_t.pth.tar --results-format csv json parquet

As timm's inference.py, but the model is rebuilt from the checkpoint (no --model needed) and fused
for inference (timm's reparameterize_model). Class names come from the class map the checkpoint
stores (this project's train.py stores one), --class-map, or ImageNet's names (timm ships them) for
models with ImageNet's class count. Images that cannot be read are named in a warning and left out.
Results go to --results-dir/--results-file (default: MODEL-SIZE in the current folder) as csv,
json or parquet, and to the console.
"""
import argparse
import json
import logging
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import utils.offline  # noqa: F401  (first: the hub client reads its switches when timm imports it)

import numpy as np
import torch
from timm.data import CustomDatasetInfo, DatasetInfoLabelMapper, ImageNetInfo, infer_imagenet_subset

import models
from utils.amp import resolve_precision
from utils.args import (
    DefaultsHelpFormatter, ModelKwargs, add_amp_options, add_input_options, add_loader_options, add_reparam_option,
    amp_requested, inference_form,
)
from utils.data import given_input_options, resolve_input_config, unreadable_count, wanted_class_map
from utils.distributed import device_problem, init_runtime, run_script
from utils.engine import check_input_size
from utils.errors import CheckpointError, DataError, OptionError, OutputError
from utils.image_list import image_list_dataset
from utils.loaders import build_eval_loader, loader_options
from utils.option_checks import at_least, thread_count
from utils.outputs import setup_logging, write_atomically, writing
from utils.results import TABLE_FORMATS, csv_text, results_format, write_parquet
from utils.weights_choice import add_weights_choice

_logger = logging.getLogger('inference')

LABEL_TYPES = ('none', 'name', 'description', 'detailed')


def inference_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='inference.py', description=__doc__.split('\n\n')[0],
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument('data', nargs='?', metavar='PATH',
                        help='a folder of images (searched recursively), a file list (.txt, one image path a line) '
                             'or an image')
    parser.add_argument('--data-dir', default='', metavar='PATH', help='same as PATH')
    parser.add_argument('--checkpoint', required=True, metavar='PATH',
                        help="a checkpoint of this project's train.py, a cleaned or averaged one, or the authors'")
    add_weights_choice(parser)
    parser.add_argument('--model', default=None, help='timm model name (default: the one the checkpoint describes)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ModelKwargs, metavar='KEY=VALUE',
                        help='more model arguments, values as Python literals')
    add_reparam_option(parser)
    parser.add_argument('--class-map', default='', metavar='FILE',
                        help='class names, one a line in label order (default: the class map the checkpoint stores)')
    parser.add_argument('--label-type', default='description', choices=LABEL_TYPES,
                        help="names in results: ImageNet's synset ids (name), their words (description, detailed), "
                             "or none; a class map's names serve for all but none")
    parser.add_argument('--topk', type=at_least(1), default=1, help='predictions per image')
    parser.add_argument('--output-type', default='prob', choices=('prob', 'logit'),
                        help='softmax probabilities or raw logits')
    parser.add_argument('--exclude-output', action='store_true', help='leave the probabilities/logits out')
    parser.add_argument('--include-index', action='store_true', help='include the class indices')
    parser.add_argument('--fullname', action='store_true',
                        help='name images by absolute path (default: as found under the folder or in the list)')
    parser.add_argument('--results-dir', default='', metavar='DIR', help='folder for the results files')
    parser.add_argument('--results-file', default='', metavar='NAME',
                        help='results file name, in --results-dir; its ending picks the format unless '
                             '--results-format is given (default: MODEL-SIZE)')
    parser.add_argument('--results-format', nargs='+', default=None, choices=TABLE_FORMATS,
                        help='one or more formats to write (default: csv)')
    parser.add_argument('--no-console-results', action='store_true', help='do not print the results')
    parser.add_argument('-b', '--batch-size', type=at_least(1), default=256, help='batch size')
    add_loader_options(parser, 'process')
    add_amp_options(parser)
    parser.add_argument('--channels-last', action='store_true', help='channels_last memory layout')
    add_input_options(parser)
    parser.add_argument('--device', default=None, help='cuda, cuda:N or cpu (default: cuda when available)')
    parser.add_argument('--threads', type=thread_count, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument('--log-freq', type=at_least(1), default=10, help='batches between progress lines')
    return parser


def label_mapper(args, model, checkpoint: models.LoadedCheckpoint) -> Optional[Callable[[int], str]]:
    """Class index -> name: the class map given or stored, else ImageNet's for a model of its class count."""
    if args.label_type == 'none':
        return None
    class_map, source = wanted_class_map(args.class_map, checkpoint)
    if class_map:
        by_label = {label: name for name, label in class_map.items()}
        beyond = [label for label in by_label if not 0 <= label < model.num_classes]
        if beyond:
            raise DataError(f'{source} has labels up to {max(by_label)}, but the model predicts only '
                            f'{model.num_classes} classes; give the class map of its training data.')
        info = CustomDatasetInfo(label_names=by_label)
    elif infer_imagenet_subset(model):
        info, source = ImageNetInfo(infer_imagenet_subset(model)), f'ImageNet ({infer_imagenet_subset(model)})'
    else:
        _logger.warning(f'No class names: {checkpoint.path} stores no class map and the model\'s {model.num_classes} '
                        f'classes are not ImageNet\'s; results give class indices (--class-map FILE names them).')
        return None
    mapper = DatasetInfoLabelMapper(info, label_type=args.label_type)
    missing = mapper.coverage(model.num_classes).missing
    if missing:
        _logger.warning(f'{source} names {model.num_classes - missing} of the {model.num_classes} classes; the '
                        f'others are labelled <unmapped:INDEX>.')
    _logger.info(f'Class names from {source}.')
    return mapper


def build_model(args, runtime):
    checkpoint = models.read_checkpoint(args.checkpoint, use_ema=args.use_ema)
    model = inference_form(models.create_model_from_checkpoint(checkpoint, model_name=args.model,
                                                              **args.model_kwargs), args)
    model.to(runtime.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return checkpoint, model


def predict(model, loader, runtime, autocast, args, top_k: int) -> tuple:
    """(sample indices, top-k class indices, their probabilities or logits) of every readable image."""
    indices, classes, outputs = [], [], []
    start = time.time()
    with torch.inference_mode():
        for batch_index, batch in enumerate(loader):
            images, sample_indices = batch
            if not len(sample_indices):  # every image of the batch was unreadable
                continue
            images = images.to(runtime.device)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = model(images)
            values = logits.float().softmax(-1) if args.output_type == 'prob' else logits.float()
            values, top = values.topk(top_k)
            indices.append(sample_indices.cpu().numpy())
            classes.append(top.cpu().numpy())
            outputs.append(values.cpu().numpy())
            if batch_index % args.log_freq == 0:
                _logger.info(f'Predict: [{batch_index + 1}/{len(loader)}] {time.time() - start:.1f}s')
    if not indices:
        return np.zeros(0, np.int64), np.zeros((0, top_k), np.int64), np.zeros((0, top_k), np.float32)
    return np.concatenate(indices), np.concatenate(classes), np.concatenate(outputs)


def result_columns(args, names: List[str], classes, outputs, to_label) -> dict:
    """Column name -> one value per image: the file name, then the class indices, names and outputs
    (a list of k per image, or the value itself for --topk 1, as in timm)."""
    def cells(array):
        return [row[0] if len(row) == 1 else list(row) for row in array.tolist()]

    columns = {'filename': names}
    if args.include_index or to_label is None:
        columns['index'] = cells(classes)
    if to_label is not None:
        columns['label'] = cells(np.vectorize(to_label, otypes=[object])(classes)) if len(classes) else []
    if not args.exclude_output:
        columns[args.output_type] = cells(outputs)
    return columns


def wide_rows(columns: Dict[str, list]) -> List[dict]:
    """One row per image; a column of k values per image becomes k columns NAME_0 .. NAME_{k-1}, as in timm."""
    wide = {}
    for name, values in columns.items():
        if values and isinstance(values[0], list):
            wide.update({f'{name}_{i}': [v[i] for v in values] for i in range(len(values[0]))})
        else:
            wide[name] = values
    return [dict(zip(wide, cells)) for cells in zip(*wide.values())]


def json_text(columns: dict) -> str:
    """{file name: {column: value}}, as timm's json results."""
    names = columns['filename']
    rest = {k: v for k, v in columns.items() if k != 'filename'}
    return json.dumps({name: {k: v[i] for k, v in rest.items()} for i, name in enumerate(names)}, indent=2)


def results_base(args, model, data_config) -> str:
    """The results path without its ending: --results-file (its ending dropped), else MODEL-SIZE, in --results-dir."""
    if args.results_file:
        stem, ending = os.path.splitext(args.results_file)
        name = stem if ending.lstrip('.') in TABLE_FORMATS else args.results_file
    else:
        name = f'{model.pretrained_cfg["architecture"]}-{data_config["input_size"][-1]}'
    return os.path.join(args.results_dir, name)


def write_predictions(columns: dict, base: str, formats: List[str]) -> List[str]:
    """BASE.csv, BASE.json and BASE.parquet as `formats` asks; returns their paths."""
    written = []
    for fmt in formats:
        path = f'{base}.{fmt}'
        with writing(path, '--results-dir'):
            if fmt == 'parquet':
                write_parquet(path, columns)
            else:
                write_atomically(path, csv_text(wide_rows(columns)) if fmt == 'csv' else json_text(columns) + '\n')
        written.append(path)
    return written


def infer(args):
    runtime = init_runtime(args.device, threads=args.threads)
    dataset = image_list_dataset(args.data_dir)
    checkpoint, model = build_model(args, runtime)
    to_label = label_mapper(args, model, checkpoint)
    data_config = resolve_input_config(given_input_options(args), model)
    loader = build_eval_loader(dataset, data_config, args.batch_size, runtime, loader_options(args, runtime.device))
    check_input_size(model, data_config['input_size'], runtime.device)
    _, _, precision = resolve_precision(runtime.device, amp=amp_requested(args), amp_dtype=args.amp_dtype)
    top_k = min(args.topk, model.num_classes)
    if top_k < args.topk:
        _logger.info(f'--topk {args.topk}: the model has only {model.num_classes} classes; giving {top_k}.')
    _logger.info(f'Predicting {len(dataset)} images with {checkpoint.weights} of {args.checkpoint} on '
                 f'{runtime.device}, {precision.description}, input {data_config["input_size"]} crop '
                 f'{data_config["crop_pct"]} {data_config["interpolation"]}.')
    sample_indices, classes, outputs = predict(model, loader, runtime, precision.autocast, args, top_k)
    unreadable = unreadable_count(dataset)
    if not len(sample_indices):
        raise DataError(f'none of the {len(dataset)} images could be read; the warnings above name them.')
    if unreadable:
        _logger.warning(f'{unreadable} of {len(dataset)} images could not be read and have no results; the '
                        f'warnings above name them.')
    names = [dataset.reader.filename(i, absolute=args.fullname) for i in sample_indices.tolist()]
    columns = result_columns(args, names, classes, outputs, to_label)
    written = write_predictions(columns, results_base(args, model, data_config), args.results_format)
    _logger.info(f'Results for {len(names)} images written to {", ".join(written)}.')
    if not args.no_console_results:
        print(json_text(columns))


def check_options(parser, args):
    """Stop with the option named when the options cannot work together, or the device cannot be used (each
    value alone was checked as parsed)."""
    args.data_dir = args.data or args.data_dir
    if not args.data_dir:
        parser.error('give the images to predict on (PATH or --data-dir).')
    if args.data and args.data_dir != args.data:
        parser.error('give the images once, as PATH or --data-dir.')
    if args.exclude_output and args.label_type == 'none' and not args.include_index:
        parser.error('--exclude-output with --label-type none leaves nothing to write; add --include-index.')
    if args.results_format is None:
        args.results_format = [results_format(args.results_file, formats=TABLE_FORMATS) or 'csv']
    if 'parquet' in args.results_format:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            parser.error('parquet results need pyarrow: pip install pyarrow (requirements-dev.txt has it).')
    if args.device and device_problem(args.device):
        parser.error(device_problem(args.device))


def main(argv=None) -> int:
    parser = inference_parser()
    args = parser.parse_args(argv)
    check_options(parser, args)
    setup_logging(None, True)
    return run_script(infer, args, (DataError, CheckpointError, OptionError, OutputError), _logger)


if __name__ == '__main__':
    sys.exit(main())
