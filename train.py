#!/usr/bin/env python3
"""Train PosMLP: the paper's ImageNet recipe on GPUs, or the quickstart on a CPU.

    python train.py -c configs/quickstart.yaml
    ./distributed_train.sh 8 /path/to/imagenet -c configs/posmlp_t.yaml

Options: `python train.py --help` (utils/args.py). The recipe's pieces are built in utils/recipe.py, the
epoch loops are in utils/engine.py; the run folder and its records in utils/outputs.py, the checkpoints
it keeps and resuming from them in utils/run_checkpoints.py; data in utils/data.py, batches in
utils/loaders.py.
"""
import logging
import os
import sys
import time
import warnings

import utils.offline  # noqa: F401  (first: the hub client reads its switches when timm imports it)

import torch
from timm.utils import random_seed

from utils.amp import resolve_precision, use_tf32_and_cudnn_benchmark
from utils.args import parse_train_args, plain_args
from utils.data import class_to_idx, given_input_options, resolve_input_config, resolve_num_classes, unreadable_count
from utils.distributed import init_runtime, run_script
from utils.engine import TrainSettings, evaluate_epoch, train_one_epoch, updates_per_epoch
from utils.errors import CheckpointError, DataError, NonFiniteLossError, OptionError, OutputError
from utils.loaders import build_eval_loader, build_train_loader, loader_options, mixup_arguments, stop_mixing
from utils.outputs import RunRecorder, held_for_the_run_log, open_run_folder
from utils.recipe import (
    create_model, create_model_ema, create_optimizer, create_schedule, global_batch, place_model, resume,
    steps_per_epoch, training_datasets, training_loss, wrap_ddp,
)
from utils.run_checkpoints import training_state
from utils.weights_choice import ranked_by, ranking_metric

_logger = logging.getLogger('train')

# DDP compares gradient and parameter strides literally; grouped-conv weights of shape (C, 1, 3, 3) differ
# only in the stride of their size-1 dimension, which is the same memory layout.
warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides')
RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')


def train(args):
    runtime = init_runtime(args.device, args.dist_backend, args.threads)
    use_tf32_and_cudnn_benchmark(runtime.device)
    run = open_run_folder(args, runtime)
    note_the_options(args)
    random_seed(args.seed, runtime.rank)

    # Data: the splits, and the number of classes they hold.
    train_set, val_set = training_datasets(args, runtime)
    num_classes = resolve_num_classes(train_set, args.num_classes)

    # Model, and the input it takes: the model's data config unless the options override it.
    model, model_kwargs = create_model(args, num_classes)
    data_config = resolve_input_config(given_input_options(args), model)
    _logger.info(f'Data {args.data_dir}: {len(train_set)} train and {len(val_set)} val images, config {data_config}')
    model = place_model(model, args, runtime)

    # Optimizer, precision and EMA.
    optimizer = create_optimizer(model, args)
    model, optimizer, precision = resolve_precision(
        runtime.device, amp=args.amp or args.native_amp, apex=args.apex_amp, amp_dtype=args.amp_dtype,
        model=model, optimizer=optimizer, announce=runtime.is_primary)
    model_ema = create_model_ema(model, args)

    # Batches, and the learning-rate schedule over their updates; a resumed run goes on where it stopped.
    loading = loader_options(args, runtime.device)
    train_loader, device_mixup = build_train_loader(train_set, args, data_config, runtime, num_classes, loading)
    val_loader = build_eval_loader(val_set, data_config, args.validation_batch_size or args.batch_size, runtime,
                                   loading)
    _logger.info(f'Loading: {loading.description}')
    steps = steps_per_epoch(train_loader, args)
    updates = updates_per_epoch(steps, args.grad_accum_steps)
    scheduler, num_epochs = create_schedule(optimizer, args, updates)
    start_epoch = 0
    if args.resume:
        start_epoch = resume(args, run.resumed_epoch, run.resumed_args, num_epochs, updates, model, optimizer,
                             scheduler, precision.loss_scaler, model_ema, runtime)

    ema_eval_model = model_ema.module if model_ema is not None else None
    if args.torchcompile:  # the EMA model too, as timm compiles it for its evaluation
        model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
        if ema_eval_model is not None:
            ema_eval_model = torch.compile(ema_eval_model, backend=args.torchcompile, mode=args.torchcompile_mode)
    eval_model = model
    if runtime.distributed:
        model = wrap_ddp(model, runtime, args)
    mixing = mixup_arguments(args, num_classes) is not None
    loss_fn = training_loss(args, mixing).to(runtime.device)  # mixup/cutmix make soft targets
    settings = TrainSettings(
        steps=steps, grad_accum_steps=args.grad_accum_steps, clip_grad=args.clip_grad or None,
        clip_mode=args.clip_mode, channels_last=args.channels_last, log_interval=args.log_interval,
        autocast=precision.autocast, loss_scaler=precision.loss_scaler, mixup=device_mixup)
    recorder = RunRecorder(run.folder, args, start_epoch) if runtime.is_primary else None
    _logger.info(f'Global batch {global_batch(args, runtime)} = {args.batch_size} per process x {runtime.world_size} process(es) x '
                 f'{args.grad_accum_steps} accumulated; lr {args.lr:g} as given, not rescaled for the global batch.')
    _logger.info(f'Precision: {precision.description}. Epochs {start_epoch}..{num_epochs - 1}, {steps} steps '
                 f'and {updates} updates each; checkpoints ranked by {ranked_by(args)}.')

    num_updates = start_epoch * updates
    for epoch in range(start_epoch, num_epochs):
        epoch_start = time.time()
        if runtime.distributed:
            train_loader.sampler.set_epoch(epoch)
        if mixing and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            stop_mixing(train_loader, device_mixup)
        train_metrics, num_updates = train_one_epoch(
            epoch, model, train_loader, optimizer, loss_fn, runtime, settings,
            scheduler=scheduler, model_ema=model_ema, num_updates=num_updates)
        eval_metrics, ema_metrics = evaluate_epoch(eval_model, model_ema, val_loader, runtime, precision.autocast,
                                                   args.channels_last, args.dist_bn, ema_eval_model)
        metric = ranking_metric(args, eval_metrics, ema_metrics)
        if scheduler is not None:
            scheduler.step(epoch + 1, metric)
        if recorder is not None:
            state = training_state(epoch, args.model, model_kwargs, model, optimizer, scheduler, precision.loss_scaler,
                                   model_ema, plain_args(args), metric, class_to_idx(train_set),
                                   global_batch(args, runtime))
            recorder.record(state, time.time() - epoch_start, train_metrics, eval_metrics, ema_metrics,
                            unreadable_count(train_set) + unreadable_count(val_set))
    if recorder is not None:
        recorder.finish()


def note_the_options(args):
    """Say where options a bare run leaves out come from: the checkpoint it resumes, or the model's recipe."""
    if args.resume:
        _logger.info(f'Resuming {args.resume}: options given neither here nor in a config are the ones it records.')
    recipe = os.path.join(RECIPES, f'{args.model}.yaml')
    if not args.config and not args.resume and os.path.isfile(recipe):
        _logger.info(f'No -c given: {recipe} holds the recipe for {args.model} (lr, batch size, schedule, '
                     f'augmentation, EMA and AMP, with where they come from); pass it with -c to use it.')


def main(argv=None) -> int:
    with held_for_the_run_log():  # what reading the options warns of goes into train.log
        args = parse_train_args(argv)
    try:
        return run_script(train, args, (DataError, CheckpointError, NonFiniteLossError, OptionError, OutputError),
                          _logger)
    except KeyboardInterrupt:
        # Every file is written through a temporary one, so the checkpoints on disk are whole.
        _logger.error('Stopped by Ctrl-C. The checkpoints written before are whole: continue the run with --resume '
                      'RUN_FOLDER/last.pth.tar.')
        return 130


if __name__ == '__main__':
    sys.exit(main())
