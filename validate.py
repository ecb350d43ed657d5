#!/usr/bin/env python3
"""Evaluate a checkpoint on a validation split: top-1, top-5, loss, parameters and throughput.

    python validate.py /imagenet/val --checkpoint posmlp_t.pth.tar
    torchrun --nproc_per_node 2 validate.py /imagenet --checkpoint output/train/run/model_best.pth.tar

The checkpoint may be this project's (it names its model) or the authors' (the architecture is read
off the weights), so --model is optional. EMA weights are used when the checkpoint has them. The
input size, crop and normalisation are the ones the checkpoint was trained with when it records
them, else the model's defaults; options given here override both. With N processes every image
is evaluated exactly once: top-1 and top-5 equal those of one process, and the loss agrees to float32
rounding (README, Evaluation).
"""
import argparse
import json
import logging
import sys
import time
from typing import Optional

import utils.offline  # noqa: F401  (first: the hub client reads its switches when timm imports it)

import torch

import models
from utils.amp import resolve_precision, use_tf32_and_cudnn_benchmark
from utils.args import (
    DefaultsHelpFormatter, ModelKwargs, add_amp_options, add_input_options, add_loader_options, add_reparam_option,
    add_torchcompile_options, amp_requested, check_torchcompile, inference_form, resolve_data_root,
)
from utils.data import (
    class_folder_names, class_to_idx, create_split_dataset, evaluation_folder, given_input_options, num_classes_of,
    recorded_input_options, resolve_input_config, unreadable_count, wanted_class_map,
)
from utils.distributed import device_problem, init_runtime, run_script
from utils.engine import check_input_size, evaluate
from utils.errors import CheckpointError, DataError, OptionError, OutputError
from utils.loaders import build_eval_loader, loader_options
from utils.option_checks import at_least, bad_image_limit, model_name_problem, thread_count
from utils.outputs import setup_logging, writing
from utils.results import command_line, results_format, run_environment, write_results
from utils.weights_choice import add_weights_choice, describe_weights

_logger = logging.getLogger('validate')


def validate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='validate.py', description=__doc__.split('\n\n')[0],
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument('data', nargs='?', metavar='DIR',
                        help='validation split folder (one folder per class), or a root with val/ or validation/')
    parser.add_argument('--data-dir', default='', metavar='DIR', help='same as DIR')
    parser.add_argument('--dataset', default='', help="'' for an image folder, or a timm dataset spec")
    parser.add_argument('--split', default='validation',
                        help="split to evaluate: a timm dataset spec's split, or the subfolder of an image-folder "
                             "root (the default takes val/ or validation/)")
    parser.add_argument('--checkpoint', required=True, metavar='PATH',
                        help="a checkpoint of this project's train.py or the authors' release")
    parser.add_argument('--class-map', default='', metavar='FILE',
                        help="label of each class folder: timm's class map, a .txt file with one class name a line "
                             "in label order (or a .pkl dict name -> label); default: the map the checkpoint "
                             "stores (this project's train.py stores one)")
    add_weights_choice(parser)
    parser.add_argument('--model', default=None, help='timm model name (default: the one the checkpoint describes)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ModelKwargs, metavar='KEY=VALUE',
                        help='more model arguments, values as Python literals')
    add_reparam_option(parser)
    parser.add_argument('-b', '--batch-size', type=at_least(1), default=256, help='batch size per process')
    add_loader_options(parser, 'process')
    parser.add_argument('--keep-empty-classes', action='store_true',
                        help='keep class folders without images as classes, instead of refusing them')
    add_amp_options(parser)
    parser.add_argument('--channels-last', action='store_true', help='channels_last memory layout')
    add_torchcompile_options(parser)
    add_input_options(parser)
    parser.add_argument('--max-bad-images', type=bad_image_limit, default=None, metavar='N',
                        help='unreadable images left out of the results (all processes together) before '
                             'stopping (default: 1%% of the split); image folders only, not --dataset')
    parser.add_argument('--device', default=None, help='cuda, cuda:N or cpu (default: cuda when available)')
    parser.add_argument('--threads', type=thread_count, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument('--log-interval', type=at_least(1), default=50, help='batches between progress lines')
    parser.add_argument('--results-file', default='', metavar='PATH', help='write the results to a .csv or .json file')
    return parser


def labelled_folder(data_dir: str, args, loaded: models.LoadedCheckpoint, model_classes: Optional[int]):
    """The image folder with each class folder labelled as the model's head has it.

    Labels come from a class map (given or stored in the checkpoint); without one the class folders are
    numbered in order, which is right only when the folder holds every class of the head.
    """
    class_map, source = wanted_class_map(args.class_map, loaded)
    if class_map is None:
        dataset = create_split_dataset('', data_dir, 'validation', args.max_bad_images,
                                       keep_empty_classes=args.keep_empty_classes)
        folder_classes = len(class_to_idx(dataset))
        if model_classes and folder_classes > model_classes:
            raise DataError(f'{data_dir} has {folder_classes} classes but the model predicts {model_classes}; '
                            f'evaluate it on the validation split of the data it was trained on.')
        if model_classes and folder_classes < model_classes:
            raise DataError(
                f'{data_dir} has {folder_classes} class folders but the model predicts {model_classes} '
                f'classes, and nothing says which labels those folders are: numbering them from 0 would mislabel '
                f'them. Pass --class-map FILE (the training class names, one a line in label order), or evaluate '
                f"a checkpoint written by this project's train.py, which stores the map.")
        return dataset
    unknown = sorted(set(class_folder_names(data_dir)) - set(class_map))
    if unknown:
        raise DataError(f'{data_dir} has class folders that {source} lacks: {", ".join(unknown[:10])}'
                        f'{f" ... ({len(unknown)} in all)" if len(unknown) > 10 else ""}; evaluate on classes '
                        f'the model was trained on, or give the class map of its training data.')
    if model_classes and max(class_map.values()) >= model_classes:
        raise DataError(f'{source} has labels up to {max(class_map.values())}, but the model predicts only '
                        f'{model_classes} classes; give the class map of its training data.')
    return create_split_dataset('', data_dir, 'validation', args.max_bad_images, class_map=class_map,
                                keep_empty_classes=args.keep_empty_classes)


def evaluation_dataset(args, data_dir: str, loaded: models.LoadedCheckpoint, model):
    """The split to evaluate: a timm dataset's, or an image folder labelled as the model's head has it."""
    model_classes = getattr(model, 'num_classes', None)
    if not args.dataset:
        return labelled_folder(data_dir, args, loaded, model_classes)
    dataset = create_split_dataset(args.dataset, data_dir, args.split, args.max_bad_images)
    data_classes = num_classes_of(dataset)
    if model_classes and data_classes > model_classes:
        raise DataError(f'{data_dir} has {data_classes} classes but the model predicts {model_classes}; '
                        f'evaluate it on the validation split of the data it was trained on.')
    return dataset


def evaluation_input(args, loaded: models.LoadedCheckpoint, model) -> dict:
    """timm's data config: the options given here, over those the checkpoint was trained with, over the model's."""
    options = recorded_input_options(loaded.args)
    given = given_input_options(args)
    if 'img_size' in given or 'input_size' in given:
        # timm prefers input_size to img_size, so a trained input_size would beat a given --img-size.
        options.pop('img_size', None)
        options.pop('input_size', None)
    options.update(given)
    return resolve_input_config(options, model)


def validate(args) -> dict:
    runtime = init_runtime(args.device, threads=args.threads)
    use_tf32_and_cudnn_benchmark(runtime.device)
    setup_logging(None, runtime.is_primary)

    data_dir = args.data_dir if args.dataset else evaluation_folder(args.data_dir, args.split)
    loaded = models.read_checkpoint(args.checkpoint, use_ema=args.use_ema)
    model = models.create_model_from_checkpoint(loaded, model_name=args.model, **args.model_kwargs)
    params = sum(p.numel() for p in model.parameters())  # the model as trained: fusing folds some away
    model = inference_form(model, args)
    _logger.info(f'Checkpoint {args.checkpoint}: {describe_weights(loaded.weights, args.use_ema)}.')
    dataset = evaluation_dataset(args, data_dir, loaded, model)
    data_config = evaluation_input(args, loaded, model)
    loader = build_eval_loader(dataset, data_config, args.batch_size, runtime, loader_options(args, runtime.device))

    model.to(runtime.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    check_input_size(model, data_config['input_size'], runtime.device)
    _, _, precision = resolve_precision(runtime.device, amp=amp_requested(args), amp_dtype=args.amp_dtype)
    run_model = model
    if args.torchcompile:
        run_model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
    start = time.time()
    metrics = evaluate(run_model, loader, runtime, precision.autocast, args.channels_last, args.log_interval, 'Test')
    elapsed = time.time() - start
    results = dict(
        model=model.pretrained_cfg['architecture'], checkpoint=args.checkpoint, weights=loaded.weights,
        top1=metrics['top1'], top5=metrics['top5'], loss=metrics['loss'], images=metrics['count'],
        params=params, img_per_sec=metrics['count'] / max(elapsed, 1e-9),
        input_size=list(data_config['input_size']), crop_pct=data_config['crop_pct'],
        interpolation=data_config['interpolation'], fused=args.reparam, processes=runtime.world_size,
        unreadable_images=unreadable_count(dataset),
    )
    if runtime.is_primary:
        report(args, results, data_dir, data_config, precision.description, runtime)
    return results


def report(args, results: dict, data_dir: str, data_config: dict, precision: str, runtime):
    """Log and print the results, and write them to --results-file."""
    left_out = results['unreadable_images']
    _logger.info(
        f'Validated on {data_dir}: top1 {results["top1"]:.3f}  top5 {results["top5"]:.3f}  '
        f'loss {results["loss"]:.4f} | {results["images"]} images'
        f'{f" ({left_out} unreadable ones left out)" if left_out else ""}, {results["params"]:,} params, '
        f'{results["img_per_sec"]:.1f} img/s, {precision}, {runtime.world_size} process(es), '
        f'input {data_config["input_size"]} crop {data_config["crop_pct"]} {data_config["interpolation"]}')
    print(json.dumps(results, indent=2))
    if args.results_file:
        try:
            with writing(args.results_file, '--results-file'):
                write_results(args.results_file, [results], run_environment(args.command, runtime.device))
        except OutputError as e:
            raise OutputError(f'{e} The results are printed above.') from None


def check_options(parser: argparse.ArgumentParser, args):
    """Stop with the option named when the options cannot work together, or the model or device cannot be
    used (each value alone was checked as parsed)."""
    if args.class_map and args.dataset:
        parser.error('--class-map applies to image folders only, not to --dataset; leave it out.')
    if args.results_file and results_format(args.results_file) is None:
        parser.error(f'--results-file {args.results_file}: name it .csv or .json to choose the format.')
    if not (args.data_dir or args.dataset):
        parser.error('give the data folder to evaluate on (DIR or --data-dir).')
    problem = model_name_problem(args.model) if args.model else None
    if problem:
        parser.error(f'--model {args.model}: {problem} Or leave --model out to build the one the checkpoint describes.')
    if args.device and device_problem(args.device):
        parser.error(device_problem(args.device))
    check_torchcompile(parser, args)


def main(argv=None) -> int:
    parser = validate_parser()
    args = parser.parse_args(argv)
    args.command = command_line('validate.py', sys.argv[1:] if argv is None else argv)
    args.data_dir = resolve_data_root(parser, args, config={})
    check_options(parser, args)
    return run_script(validate, args, (DataError, CheckpointError, OptionError, OutputError), _logger)


if __name__ == '__main__':
    sys.exit(main())
