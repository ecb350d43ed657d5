#!/usr/bin/env python3
"""Train PosMLP: the paper's ImageNet recipe on GPUs, or the quickstart on a CPU.

    python train.py -c configs/quickstart.yaml
    ./distributed_train.sh 8 /path/to/imagenet -c configs/posmlp_t.yaml

Options: `python train.py --help`. The epoch loops are in utils/engine.py; checkpoints, resuming and
the kept files in utils/checkpointing.py; data in utils/data.py, batches in utils/loaders.py.
"""
import inspect
import logging
import os
import sys
import time
import warnings

import utils.offline  # noqa: F401  (first: the hub client reads its switches when timm imports it)

import timm
import torch
import torch.nn as nn
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, distribute_bn, random_seed
from torch.nn.parallel import DistributedDataParallel

import models
from utils.amp import resolve_precision, use_tf32_and_cudnn_benchmark
from utils.args import parse_train_args, plain_args, write_args_yaml
from utils.checkpointing import (
    CheckpointKeeper, remove_stale_temporaries, resume_point, resume_training, training_state,
)
from utils.data import (
    class_to_idx, create_training_datasets, resolve_input_config, resolve_num_classes, unreadable_count,
)
from utils.digits import prepare_digits
from utils.distributed import barrier, from_primary, init_runtime, run_script
from utils.engine import TrainSettings, evaluate, train_one_epoch, updates_per_epoch
from utils.errors import CheckpointError, DataError, NonFiniteLossError, OptionError, OutputError
from utils.loaders import build_eval_loader, build_train_loader, loader_options, mixup_arguments, stop_mixing
from utils.outputs import (
    LOG_FILE, SUMMARY_FILE, WandbLogger, append_summary, args_yaml_path, claim_run_folder,
    format_metrics, setup_logging, summary_row, supersede_summary_rows, writing,
)

_logger = logging.getLogger('train')

# DDP compares gradient and parameter strides literally; grouped-conv weights of shape (C, 1, 3, 3) differ
# only in the stride of their size-1 dimension, which is the same memory layout.
warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides')


def model_kwargs_from_args(args, num_classes: int) -> dict:
    """The arguments the model is built with; saved in checkpoints so it can be rebuilt by name."""
    kwargs = dict(num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path)
    if args.img_size:
        kwargs['img_size'] = args.img_size
    if args.in_chans:
        kwargs['in_chans'] = args.in_chans
    kwargs.update(args.model_kwargs)
    return kwargs


# The options a resumed run's schedule is rebuilt from; changing them changes the rest of the run's schedule.
SCHEDULE_OPTIONS = ('sched', 'sched_on_updates', 'lr', 'epochs', 'warmup_epochs', 'warmup_lr', 'warmup_prefix',
                    'min_lr', 'cooldown_epochs', 'decay_epochs', 'decay_milestones', 'decay_rate', 'patience_epochs')


def log_schedule_changes(args, resumed_args: dict):
    """Name the schedule options that differ from the resumed run's: the schedule follows the new values."""
    current = plain_args(args)
    changed = [f'--{name.replace("_", "-")} {current[name]} (was {resumed_args[name]})'
               for name in SCHEDULE_OPTIONS if name in resumed_args and resumed_args[name] != current[name]]
    if changed:
        _logger.info('The learning-rate schedule is rebuilt from this run\'s options, which differ from the resumed '
                     'run\'s: ' + ', '.join(changed))


def training_loss(args, mixup_active: bool) -> nn.Module:
    if args.bce_loss:
        return BinaryCrossEntropy(smoothing=0. if mixup_active else args.smoothing)
    if mixup_active:
        return SoftTargetCrossEntropy()  # mixup already smooths the soft targets
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


# torch 2.14 renamed DDP's broadcast_buffers (deprecating it) to forward_sync_buffers; torch 2.6 has only the old one.
_DDP_OPTIONS = inspect.signature(DistributedDataParallel).parameters
DDP_BUFFER_OPTION = 'forward_sync_buffers' if 'forward_sync_buffers' in _DDP_OPTIONS else 'broadcast_buffers'


def wrap_ddp(model, runtime, args) -> DistributedDataParallel:
    """DDP without broadcasting buffers before every forward unless --ddp-bb (see its option for why)."""
    device_ids = [runtime.local_rank] if runtime.device.type == 'cuda' else None
    model = DistributedDataParallel(model, device_ids=device_ids, **{DDP_BUFFER_OPTION: args.ddp_bb})
    synced_bn = args.sync_bn and runtime.device.type == 'cuda'
    if runtime.is_primary and not (model.broadcast_buffers or args.dist_bn or synced_bn):
        _logger.warning("--dist-bn '' without --ddp-bb: each process keeps BatchNorm statistics of its own data, so "
                        "the processes evaluate different models and checkpoints hold process 0's; keep --dist-bn "
                        "reduce, or add --ddp-bb.")
    _logger.info(f'DistributedDataParallel over {runtime.world_size} processes, '
                 f'broadcast_buffers={model.broadcast_buffers}')
    return model


def train(args):
    runtime = init_runtime(args.device, args.dist_backend, args.threads)
    use_tf32_and_cudnn_benchmark(runtime.device)
    setup_logging(None, runtime.is_primary)
    # Rank 0 checks the checkpoint to resume from and claims the folder before anything is written: the ranks'
    # clocks may name a new folder differently, and a folder on rank 0's disk may not be visible to the others.
    output_dir, resumed_epoch, resumed_args, problem = None, None, None, None
    if runtime.is_primary:
        try:
            if args.resume:
                resumed_epoch, resumed_args = resume_point(args.resume)
            output_dir = claim_run_folder(args, resumed_args)
        except (CheckpointError, OptionError, OutputError) as e:
            problem = e
    output_dir, resumed_epoch, problem = from_primary((output_dir, resumed_epoch, problem), runtime)
    if problem:
        raise problem
    setup_logging(os.path.join(output_dir, LOG_FILE), runtime.is_primary)
    _logger.info(f'Training on {runtime.device}, {runtime.world_size} process(es); output in {output_dir}')
    if runtime.is_primary:
        with writing(output_dir):
            stale = remove_stale_temporaries(output_dir)
        if stale:
            _logger.warning(f'Removed {len(stale)} temporary file(s) that an interrupted write left: '
                            + ', '.join(stale))
    if args.resume:
        _logger.info(f'Resuming {args.resume}: options given neither here nor in a config are the ones it records.')
    recipe = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', f'{args.model}.yaml')
    if not args.config and not args.resume and os.path.isfile(recipe):
        _logger.info(f'No -c given: {recipe} holds the paper\'s full recipe for {args.model} (EMA, AMP, its lr '
                     f'and batch size); pass it with -c to use it.')
    random_seed(args.seed, runtime.rank)

    # Data: the splits, and the number of classes they hold.
    dataset = args.dataset
    if dataset == 'digits':
        if runtime.is_primary:
            prepare_digits(args.data_dir)
        barrier(runtime)
        dataset = ''
    train_set, val_set = create_training_datasets(
        dataset, args.data_dir, args.train_split, args.val_split, args.max_bad_images, args.keep_empty_classes)
    num_classes = resolve_num_classes(train_set, args.num_classes)
    training_classes = class_to_idx(train_set)  # saved in checkpoints: folder name -> label

    # Model, optionally starting from other weights (fine-tuning re-initialises a head of another size).
    model_kwargs = model_kwargs_from_args(args, num_classes)
    try:
        model = timm.create_model(args.model, **model_kwargs)
    except (TypeError, ValueError) as e:
        raise OptionError(f'cannot build {args.model} with {model_kwargs}: {e}. Check --model-kwargs '
                          f'(and --img-size, --drop, --drop-path).') from None
    if args.initial_checkpoint:
        loaded = models.read_checkpoint(args.initial_checkpoint)
        models.load_weights(model, loaded.state_dict, f'{args.initial_checkpoint} ({loaded.weights})', finetune=True)
        _logger.info(f'Initial weights: {loaded.weights} of {args.initial_checkpoint}')
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    _logger.info(f'Model {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters), '
                 f'{num_classes} classes, kwargs {model_kwargs}')

    # Transforms follow the model's data config unless the options override it.
    input_options = ('input_size', 'img_size', 'in_chans', 'crop_pct', 'mean', 'std', 'interpolation')
    data_config = resolve_input_config({k: getattr(args, k) for k in input_options}, model)
    _logger.info(f'Data {args.data_dir}: {len(train_set)} train and {len(val_set)} val images, config {data_config}')

    model.to(runtime.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn and runtime.distributed:
        if runtime.device.type == 'cuda':
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            _logger.warning('--sync-bn needs GPUs (torch has no SyncBatchNorm on the CPU); '
                            'BatchNorm stays per process.')

    # Optimizer, precision, EMA and schedule.
    try:
        optimizer = create_optimizer_v2(model, **optimizer_kwargs(args))
    except ValueError as e:
        raise OptionError(f'--opt {args.opt}: {e}; see timm.optim.list_optimizers() for the names.') from None
    model, optimizer, precision = resolve_precision(
        runtime.device, amp=args.amp or args.native_amp, apex=args.apex_amp, amp_dtype=args.amp_dtype,
        model=model, optimizer=optimizer, announce=runtime.is_primary)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
    loading = loader_options(args, runtime.device)
    train_loader, device_mixup = build_train_loader(train_set, args, data_config, runtime, num_classes, loading)
    val_loader = build_eval_loader(val_set, data_config, args.validation_batch_size or args.batch_size, runtime,
                                   loading)
    _logger.info(f'Loading: {loading.workers} DataLoader worker(s) per process, '
                 f'{"timm prefetcher (uint8 batches normalised on the device)" if loading.prefetcher else "no prefetcher"}'
                 f'{", pinned memory" if loading.pin_memory else ""}')
    steps = min(len(train_loader), args.max_steps_per_epoch or len(train_loader))
    if steps == 0:
        raise DataError(f'{len(train_set)} training images make no full batch of {args.batch_size} per process; '
                        f'lower -b/--batch-size.')
    updates = updates_per_epoch(steps, args.grad_accum_steps)
    try:
        scheduler, num_epochs = create_scheduler_v2(
            optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
            updates_per_epoch=updates)
    except ValueError as e:
        raise OptionError(f'--sched {args.sched}: {e} Use cosine, step, multistep, plateau, poly, tanh, '
                          f'wsd, constant or none.') from None

    start_epoch = 0
    if args.resume:
        if resumed_epoch + 1 >= num_epochs:
            raise OptionError(
                f'--resume {args.resume}: epoch {resumed_epoch} is finished, and the schedule of --epochs '
                f'{args.epochs} ends with epoch {num_epochs - 1} (cooldown included), so nothing is left to train. '
                f'To train on, pass a larger --epochs; the schedule is rebuilt from the options.')
        start_epoch = resume_training(args.resume, model, optimizer, scheduler, precision.loss_scaler, model_ema)
        if runtime.is_primary:
            log_schedule_changes(args, resumed_args)
        if scheduler is not None:
            if args.sched_on_updates:
                scheduler.step_update(start_epoch * updates)
            else:
                scheduler.step(start_epoch)

    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
    eval_model = model
    if runtime.distributed:
        model = wrap_ddp(model, runtime, args)

    # Mixup/cutmix make soft targets; the loss follows.
    mixing = mixup_arguments(args, num_classes) is not None
    loss_fn = training_loss(args, mixing).to(runtime.device)
    settings = TrainSettings(
        steps=steps, grad_accum_steps=args.grad_accum_steps, clip_grad=args.clip_grad or None,
        clip_mode=args.clip_mode, channels_last=args.channels_last, log_interval=args.log_interval,
        autocast=precision.autocast, loss_scaler=precision.loss_scaler, mixup=device_mixup)

    keeper, wandb_logger, summary_path = None, None, os.path.join(output_dir, SUMMARY_FILE)
    if runtime.is_primary:
        keeper = CheckpointKeeper(output_dir, args.checkpoint_hist, decreasing=args.eval_metric == 'loss')
        with writing(output_dir):
            write_args_yaml(args, args_yaml_path(output_dir, start_epoch))
            if start_epoch > 0:
                keeper.restore(start_epoch - 1)
                supersede_summary_rows(summary_path, start_epoch)
        wandb_logger = WandbLogger(args.log_wandb, plain_args(args), output_dir)
    ranked_by = f'{"EMA" if args.best_from_ema else "eval"} {args.eval_metric}'
    global_batch = args.batch_size * runtime.world_size * args.grad_accum_steps
    _logger.info(f'Global batch {global_batch} = {args.batch_size} per process x {runtime.world_size} process(es) x '
                 f'{args.grad_accum_steps} accumulated; lr {args.lr:g} as given, not rescaled for the global batch.')
    _logger.info(f'Precision: {precision.description}. Epochs {start_epoch}..{num_epochs - 1}, {steps} steps '
                 f'and {updates} updates each; checkpoints ranked by {ranked_by}.')

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
        if runtime.distributed and args.dist_bn:
            distribute_bn(model, runtime.world_size, args.dist_bn == 'reduce')
        eval_metrics = evaluate(eval_model, val_loader, runtime, precision.autocast, args.channels_last)
        ema_metrics = None
        if model_ema is not None:
            # Each rank's EMA averages its own BatchNorm statistics; sync them so every rank scores one model.
            if runtime.distributed and args.dist_bn:
                distribute_bn(model_ema, runtime.world_size, args.dist_bn == 'reduce')
            ema_metrics = evaluate(model_ema.module, val_loader, runtime, precision.autocast, args.channels_last)
        metric = (ema_metrics if args.best_from_ema else eval_metrics)[args.eval_metric]
        if scheduler is not None:
            scheduler.step(epoch + 1, metric)

        if runtime.is_primary:
            # The row goes first: a run killed before its checkpoint redoes the epoch and trims the row.
            row = summary_row(epoch, train_metrics['lr'], train_metrics, eval_metrics, ema_metrics)
            state = training_state(epoch, args.model, model_kwargs, model, optimizer, scheduler,
                                   precision.loss_scaler, model_ema, plain_args(args), metric, training_classes)
            with writing(output_dir, resumable=output_dir):
                append_summary(summary_path, row)
                is_best = keeper.save(state)
            wandb_logger.log(row)
            bad = unreadable_count(train_set) + unreadable_count(val_set)
            _logger.info(
                f'Epoch {epoch} done in {time.time() - epoch_start:.1f}s: train loss {train_metrics["loss"]:.4f} | '
                f'eval {format_metrics(eval_metrics)}'
                + (f' | ema {format_metrics(ema_metrics)}' if ema_metrics else '')
                + f' | {ranked_by} {metric:.3f}{" (new best)" if is_best else ""}'
                + (f' | {bad} unreadable images skipped' if bad else ''))

    if runtime.is_primary and keeper.best is not None:
        best_metric, best_epoch = keeper.best
        _logger.info(f'Best {ranked_by}: {best_metric:.3f} at epoch {best_epoch}, saved in '
                     f'{keeper.path("model_best.pth.tar")}')


def main(argv=None) -> int:
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
