"""The pieces of train.py's recipe, each built from the options: the data splits, the model, its optimizer and
loss, the learning-rate schedule, resuming a run, and DDP. train.py puts them together in this order; the
epoch loops are in utils/engine.py, what the run writes in utils/outputs.py and utils/run_checkpoints.py.
"""
import inspect
import logging
from typing import Optional, Tuple

import timm
import torch
import torch.nn as nn
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

import models
from .args import plain_args
from .data import class_to_idx, create_training_datasets
from .digits import prepare_digits
from .distributed import Runtime, barrier
from .errors import DataError, OptionError
from .run_checkpoints import check_resumed_classes, resume_training

_logger = logging.getLogger('train')

# The options a resumed run's schedule is rebuilt from; changing them changes the rest of the run's schedule.
SCHEDULE_OPTIONS = ('sched', 'sched_on_updates', 'lr', 'epochs', 'warmup_epochs', 'warmup_lr', 'warmup_prefix',
                    'min_lr', 'cooldown_epochs', 'decay_epochs', 'decay_milestones', 'decay_rate', 'patience_epochs')
# torch 2.14 renamed DDP's broadcast_buffers (deprecating it) to forward_sync_buffers; torch 2.6 has only the old one.
_DDP_OPTIONS = inspect.signature(DistributedDataParallel).parameters
DDP_BUFFER_OPTION = 'forward_sync_buffers' if 'forward_sync_buffers' in _DDP_OPTIONS else 'broadcast_buffers'


def training_datasets(args, runtime: Runtime):
    """The training and validation splits; scikit-learn's digits are written as an image folder first. A resumed
    run's training split must hold the classes its checkpoint learned, checked before anything else is built."""
    dataset = args.dataset
    if dataset == 'digits':
        if runtime.is_primary:
            prepare_digits(args.data_dir)
        barrier(runtime)
        dataset = ''
    train_set, val_set = create_training_datasets(dataset, args.data_dir, args.train_split, args.val_split,
                                                  args.max_bad_images, args.keep_empty_classes)
    if args.resume:
        check_resumed_classes(args.resume, args.data_dir, class_to_idx(train_set))
    return train_set, val_set


def model_kwargs_from_args(args, num_classes: int) -> dict:
    """The arguments the model is built with; saved in checkpoints so it can be rebuilt by name."""
    kwargs = dict(num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path)
    if args.img_size:
        kwargs['img_size'] = args.img_size
    if args.in_chans:
        kwargs['in_chans'] = args.in_chans
    kwargs.update(args.model_kwargs)
    return kwargs


def create_model(args, num_classes: int) -> Tuple[nn.Module, dict]:
    """(the model, its arguments), from --initial-checkpoint's weights when given (a head of another class
    count is re-initialised: fine-tuning)."""
    model_kwargs = model_kwargs_from_args(args, num_classes)
    try:
        model = timm.create_model(args.model, **model_kwargs)
    except (TypeError, ValueError) as e:
        raise OptionError(f'cannot build {args.model} with {model_kwargs}: {str(e).rstrip(".")}. Check '
                          f'--model-kwargs (and --img-size, --drop, --drop-path).') from None
    if args.initial_checkpoint:
        loaded = models.read_checkpoint(args.initial_checkpoint)
        models.load_weights(model, loaded.state_dict, f'{args.initial_checkpoint} ({loaded.weights})', finetune=True)
        _logger.info(f'Initial weights: {loaded.weights} of {args.initial_checkpoint}')
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    _logger.info(f'Model {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters), '
                 f'{num_classes} classes, kwargs {model_kwargs}')
    return model, model_kwargs


def place_model(model: nn.Module, args, runtime: Runtime) -> nn.Module:
    """The model on the run's device and memory layout, with synchronised BatchNorm when asked for."""
    model.to(runtime.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn and runtime.distributed:
        if runtime.device.type == 'cuda':
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            _logger.warning('--sync-bn needs GPUs (torch has no SyncBatchNorm on the CPU); '
                            'BatchNorm stays per process.')
    return model


def create_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    try:
        return create_optimizer_v2(model, **optimizer_kwargs(args))
    except ValueError as e:
        raise OptionError(f'--opt {args.opt}: {e}; see timm.optim.list_optimizers() for the names.') from None


def create_model_ema(model: nn.Module, args) -> Optional[ModelEmaV3]:
    """timm's EMA of the weights with --model-ema, else None."""
    if not args.model_ema:
        return None
    return ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)


def training_loss(args, mixup_active: bool) -> nn.Module:
    if args.bce_loss:
        return BinaryCrossEntropy(smoothing=0. if mixup_active else args.smoothing)
    if mixup_active:
        return SoftTargetCrossEntropy()  # mixup already smooths the soft targets
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def steps_per_epoch(train_loader, args) -> int:
    """Batches per epoch: the loader's, or fewer with --max-steps-per-epoch; a split without one full batch per
    process is refused."""
    steps = min(len(train_loader), args.max_steps_per_epoch or len(train_loader))
    if steps == 0:
        raise DataError(f'{len(train_loader.dataset)} training images make no full batch of {args.batch_size} per '
                        f'process; lower -b/--batch-size.')
    return steps


def create_schedule(optimizer: torch.optim.Optimizer, args, updates_per_epoch: int) -> tuple:
    """(timm's scheduler or None, the epochs it runs, cooldown included)."""
    try:
        return create_scheduler_v2(optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
                                   updates_per_epoch=updates_per_epoch)
    except ValueError as e:
        raise OptionError(f'--sched {args.sched}: {e} Use cosine, step, multistep, plateau, poly, tanh, '
                          f'wsd, constant or none.') from None


def resume(args, resumed_epoch: int, resumed_args: Optional[dict], num_epochs: int, updates_per_epoch: int, model,
           optimizer, scheduler, loss_scaler, model_ema, runtime: Runtime) -> int:
    """Restore the run --resume names and step the schedule, rebuilt from this run's options, to where it stopped
    (as timm does, so a larger --epochs extends a run); returns the epoch to continue with."""
    if resumed_epoch + 1 >= num_epochs:
        raise OptionError(
            f'--resume {args.resume}: epoch {resumed_epoch} is finished, and the schedule of --epochs '
            f'{args.epochs} ends with epoch {num_epochs - 1} (cooldown included), so nothing is left to train. '
            f'To train on, pass a larger --epochs; the schedule is rebuilt from the options.')
    start_epoch = resume_training(args.resume, model, optimizer, scheduler, loss_scaler, model_ema,
                                  global_batch(args, runtime))
    if runtime.is_primary:
        log_schedule_changes(args, resumed_args or {})
    if scheduler is not None:
        if args.sched_on_updates:
            scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            scheduler.step(start_epoch)
    return start_epoch


def global_batch(args, runtime: Runtime) -> int:
    """Images per optimizer update over all processes."""
    return args.batch_size * runtime.world_size * args.grad_accum_steps


def log_schedule_changes(args, resumed_args: dict):
    """Name the schedule options that differ from the resumed run's: the schedule follows the new values."""
    current = plain_args(args)
    changed = [f'--{name.replace("_", "-")} {current[name]} (was {resumed_args[name]})'
               for name in SCHEDULE_OPTIONS if name in resumed_args and resumed_args[name] != current[name]]
    if changed:
        _logger.info('The learning-rate schedule is rebuilt from this run\'s options, which differ from the resumed '
                     'run\'s: ' + ', '.join(changed))


def wrap_ddp(model, runtime: Runtime, args) -> DistributedDataParallel:
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
