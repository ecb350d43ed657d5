"""The epoch loops: `train_one_epoch`, `evaluate`, and `evaluate_epoch` (the live and EMA models after an epoch);
and `check_input_size`, a model's one forward before evaluation.

Progress goes to the log of rank 0 only. A non-finite loss stops every process at the next log line or
at the end of the epoch, before the epoch's checkpoints are written, so the ones on disk stay the last good
ones; the step itself reads no value off the device between forward and backward.
"""
import contextlib
import datetime
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.models import model_parameters
from timm.utils import AverageMeter, dispatch_clip_grad, distribute_bn, unwrap_model

from .data import check_unreadable
from .distributed import Runtime, sum_over_processes
from .errors import DataError, NonFiniteLossError, OptionError

_logger = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    """How one epoch of training runs (from the command line)."""
    steps: int  # batches per epoch (the loader's length, or fewer with --max-steps-per-epoch)
    grad_accum_steps: int = 1
    clip_grad: Optional[float] = None
    clip_mode: str = 'norm'
    channels_last: bool = False
    # Batches between progress lines, and between counts of unreadable images over processes (a collective
    # of one byte per image under torchrun); the count is also taken at the end of the epoch.
    log_interval: int = 50
    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    loss_scaler: Optional[object] = None
    mixup: Optional[Callable] = None


def updates_per_epoch(steps: int, grad_accum_steps: int) -> int:
    """Optimizer updates per epoch: a last, shorter accumulation group still makes an update."""
    return math.ceil(steps / grad_accum_steps)


def _to_device(images, targets, runtime: Runtime, channels_last: bool):
    """A batch on the device; batches of timm's PrefetchLoader (utils/loaders.py) are there already."""
    images = images.to(runtime.device, non_blocking=True)
    targets = targets.to(runtime.device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets


def _format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def _mean_lr(optimizer) -> float:
    lrs = [group['lr'] for group in optimizer.param_groups]
    return sum(lrs) / len(lrs)


def train_one_epoch(epoch: int, model, loader, optimizer, loss_fn, runtime: Runtime, settings: TrainSettings,
                    scheduler=None, model_ema=None, num_updates: int = 0) -> tuple:
    """One pass over `settings.steps` batches. Returns ({'loss': mean loss, 'lr': last lr}, num_updates)."""
    model.train()
    optimizer.zero_grad()
    accum = settings.grad_accum_steps
    steps = settings.steps
    # The losses are summed on the device and read only at the log interval and the end of the epoch: reading
    # one every step would make the host wait for the GPU before every backward. Throughput is timed over
    # each log interval for the same reason: a step's own time ends before the device has run it.
    losses = LossTally(runtime, epoch, steps)
    data_time = AverageMeter()
    epoch_start = interval_start = end = time.time()
    interval_images = 0
    for step, (images, targets) in enumerate(loader):
        if step >= steps:
            break
        images, targets = _to_device(images, targets, runtime, settings.channels_last)
        if settings.mixup is not None:
            images, targets = settings.mixup(images, targets)
        data_time.update(time.time() - end)
        # Every process is at this step, so the check may be collective; after data_time, which it is not.
        if step % settings.log_interval == 0:
            check_unreadable(loader.dataset, runtime)

        group_start = step - step % accum
        group_size = min(accum, steps - group_start)
        need_update = step - group_start + 1 == group_size
        # DDP all-reduces gradients only on the micro-step that updates.
        sync = contextlib.nullcontext() if need_update or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            with settings.autocast():
                loss = loss_fn(model(images), targets)
            _backward_and_step(loss / group_size, model, optimizer, settings, need_update)
        if need_update:
            optimizer.zero_grad()
            num_updates += 1
            if model_ema is not None:
                model_ema.update(model, step=num_updates)
            if scheduler is not None:
                scheduler.step_update(num_updates=num_updates)

        losses.add(loss, images.shape[0])
        interval_images += images.shape[0]
        if step % settings.log_interval == 0 or step == steps - 1:
            epoch_loss, step_loss = losses.check()  # waits for the device to finish the steps so far
            now = time.time()
            if runtime.is_primary:
                rate = interval_images * runtime.world_size / max(now - interval_start, 1e-9)
                _logger.info(
                    f'Train: {epoch} [{step + 1:>4d}/{steps} ({100. * (step + 1) / steps:3.0f}%)]  '
                    f'loss {step_loss:.4f} ({epoch_loss:.4f})  lr {_mean_lr(optimizer):.3e}  '
                    f'{rate:7.1f} img/s  data {data_time.avg:.3f}s  '
                    f'eta {_format_eta((now - epoch_start) / (step + 1) * (steps - step - 1))}')
            interval_start, interval_images = now, 0
        end = time.time()
    check_unreadable(loader.dataset, runtime)
    epoch_loss, _ = losses.check()
    return {'loss': epoch_loss, 'lr': _mean_lr(optimizer)}, num_updates


class LossTally:
    """The training losses of an epoch, summed on the device and read where the processes meet anyway.

    A NaN or infinite loss makes the float64 sum non-finite (finite losses cannot overflow it), so reading
    the sum, summed over processes, is also the check that every process agrees on: they all stop together
    with the same NonFiniteLossError, before the epoch's checkpoints are written.
    """

    def __init__(self, runtime: Runtime, epoch: int, steps: int):
        self.runtime, self.epoch, self.steps = runtime, epoch, steps
        self.total = torch.zeros((), dtype=torch.float64, device=runtime.device)
        self.last = torch.zeros_like(self.total)
        self.count, self.last_count = 0, 0
        self.added_steps, self.checked_steps = 0, 0  # steps summed, and those known to have finite losses
        self.means = (float('nan'), float('nan'))

    def add(self, loss: torch.Tensor, count: int):
        self.last = loss.detach().double() * count
        self.total += self.last
        self.count += count
        self.last_count = count
        self.added_steps += 1

    def check(self) -> tuple:
        """(mean loss of the epoch so far, of the last step) over all processes: a collective, unless no step
        was added since the last check."""
        if self.checked_steps == self.added_steps:
            return self.means
        total, count, last, last_count = sum_over_processes([self.total, self.count, self.last, self.last_count],
                                                            self.runtime)
        if not math.isfinite(total):
            first, last = self.checked_steps + 1, self.added_steps
            where = f'step {last}' if first == last else f'one of steps {first}-{last} (those since the last check)'
            raise NonFiniteLossError(
                f'the loss became {total} in epoch {self.epoch}, at {where} of {self.steps}, on at least one '
                f'process. The updates up to step {last} may have been applied to the weights in memory, so training '
                f'stopped before writing any checkpoint of this epoch: the ones on disk are the last good ones. Try '
                f'a lower --lr, a longer --warmup-epochs, --clip-grad, or training without --amp/--apex-amp.')
        self.checked_steps = self.added_steps
        self.means = (total / max(count, 1), last / max(last_count, 1))
        return self.means


def _clipped_parameters(model, clip_mode: str):
    """The parameters whose gradients are clipped: as in timm, adaptive clipping (agc) leaves the head out."""
    return model_parameters(unwrap_model(model), exclude_head='agc' in clip_mode)


def _backward_and_step(loss, model, optimizer, settings: TrainSettings, need_update: bool):
    if settings.loss_scaler is not None:
        settings.loss_scaler(loss, optimizer, clip_grad=settings.clip_grad, clip_mode=settings.clip_mode,
                             parameters=_clipped_parameters(model, settings.clip_mode), need_update=need_update)
        return
    loss.backward()
    if need_update:
        if settings.clip_grad is not None:
            dispatch_clip_grad(_clipped_parameters(model, settings.clip_mode), settings.clip_grad,
                               mode=settings.clip_mode)
        optimizer.step()


def check_input_size(model, input_size, device: torch.device):
    """Run the model on one blank image of `input_size`, so that a size it refuses (a model with fixed windows or
    token tables: ViP, EAMLP, PosMLP with dynamic_img_pad=False) is one line before any data is read."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_size, device=device))  # eval: no BatchNorm statistics of a blank
    except ValueError as e:
        raise OptionError(f'{model.pretrained_cfg["architecture"]} cannot take input {tuple(input_size)}: '
                          f'{str(e).rstrip(".")}. Give --img-size (or --input-size) a size it takes, or leave it '
                          f'out for the size the checkpoint was trained at.') from None
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model, loader, runtime: Runtime, autocast: Callable[[], ContextManager] = contextlib.nullcontext,
             channels_last: bool = False, log_interval: int = 0, name: str = 'Eval') -> dict:
    """Loss, top-1 and top-5 (top-k is capped at the class count) over the whole loader.

    Correct predictions are counted, not averaged per batch, and summed over processes with the
    sample count, so any number of processes and any batch size give the same image count, top-1 and
    top-5; the loss is summed in float32 per batch, so other splits agree with it to float32 rounding
    (README, Evaluation). Unreadable images are left out (the loader drops them); too many stop
    evaluation in every process.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=runtime.device)  # loss sum, top-1, top-5, samples
    steps = len(loader)
    for step, (images, targets) in enumerate(loader):
        if not len(targets):  # every image of the batch was unreadable
            continue
        images, targets = _to_device(images, targets, runtime, channels_last)
        with autocast():
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(targets[:, None])
        totals += torch.stack([
            F.cross_entropy(logits, targets, reduction='sum').double(),
            hits[:, 0].sum().double(),
            hits.any(dim=1).sum().double(),
            torch.tensor(float(targets.shape[0]), dtype=torch.float64, device=runtime.device),
        ])
        if log_interval and runtime.is_primary and (step % log_interval == 0 or step == steps - 1):
            _logger.info(f'{name}: [{step + 1:>4d}/{steps}]')
    # Only here, after the loop: processes may have a batch more or less, so none may wait inside it.
    check_unreadable(loader.dataset, runtime)
    loss_sum, top1, top5, count = sum_over_processes(list(totals), runtime)
    if count == 0:
        raise DataError('the validation split has no images to evaluate.')
    return {'loss': loss_sum / count, 'top1': 100. * top1 / count, 'top5': 100. * top5 / count, 'count': int(count)}


def evaluate_epoch(model, model_ema, loader, runtime: Runtime, autocast: Callable[[], ContextManager],
                   channels_last: bool, dist_bn: str, ema_eval_model=None) -> Tuple[dict, Optional[dict]]:
    """The metrics of the live model and, with EMA, of the EMA model (run as `ema_eval_model`, its compiled
    form, when given), after making each one's BatchNorm statistics agree over the processes (--dist-bn reduce
    averages them, broadcast takes process 0's)."""
    if runtime.distributed and dist_bn:
        distribute_bn(model, runtime.world_size, dist_bn == 'reduce')
    eval_metrics = evaluate(model, loader, runtime, autocast, channels_last)
    if model_ema is None:
        return eval_metrics, None
    # Each rank's EMA averages its own BatchNorm statistics; sync them so every rank scores one model.
    if runtime.distributed and dist_bn:
        distribute_bn(model_ema, runtime.world_size, dist_bn == 'reduce')
    ema_eval_model = ema_eval_model if ema_eval_model is not None else model_ema.module
    return eval_metrics, evaluate(ema_eval_model, loader, runtime, autocast, channels_last)
