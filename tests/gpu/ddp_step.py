"""GPU check, part `ddp`: the project's training step through DistributedDataParallel on NCCL.

    python3 -m torch.distributed.run --standalone --nproc_per_node 1 tests/gpu/ddp_step.py --result ddp.json

train.py wraps the model in DDP only with two or more processes; this process joins a one-process group
itself and drives utils.engine.train_one_epoch with the model wrapped by utils.recipe.wrap_ddp (as train.py wraps it), so one GPU
runs what every GPU of a multi-GPU run does: float16 autocast with timm's loss scaler, gradient clipping
after unscaling, gradient accumulation (no_sync on the micro-steps that do not update), EMA and NCCL's
all-reduce of the gradients. It trains posmlp_t on a small fixed set of images whose class shows in
their colour, and checks that the training loss goes down, the parameters and the EMA move, clipping runs at
every update and nothing becomes non-finite. Exit status 1 names the checks that failed.
--device cpu --backend gloo --smoke runs the same on the CPU with a tiny model.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import types
from pathlib import Path

import project  # first: it runs the hub client offline before timm loads it

import timm
import timm.utils.cuda
import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, TensorDataset

CLASSES = 4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cuda', help='cuda or cpu (default: cuda)')
    parser.add_argument('--backend', default='nccl', help='process group backend (default: nccl)')
    parser.add_argument('--smoke', action='store_true', help='a tiny model at 64 px, to check this script on a CPU')
    parser.add_argument('--amp-dtype', default='float16', help='autocast type (default: float16, with a loss scaler)')
    parser.add_argument('--lr', type=float, default=5e-4)
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--steps', type=int, default=8, help='batches per epoch')
    parser.add_argument('--grad-accum-steps', type=int, default=2)
    parser.add_argument('-b', '--batch-size', type=int, default=16)
    parser.add_argument('--result', default=None, metavar='FILE', help='write the measured numbers here (JSON)')
    return parser.parse_args(argv)


def coloured_images(count: int, side: int) -> TensorDataset:
    """Noise plus a class colour: a task a few updates can start to learn."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(count) % CLASSES
    colours = torch.randn(CLASSES, 3, 1, 1, generator=generator)
    images = torch.randn(count, 3, side, side, generator=generator) * 0.5 + colours[labels]
    return TensorDataset(images, labels)


class ClipSpy:
    """Stands in for the clipping function timm's NativeScaler calls: clips as it does, then measures the
    gradient norm it left, so the check sees clipping happen on the unscaled gradients of every update."""

    def __init__(self, clip):
        self.clip = clip
        self.norms = []

    def __call__(self, parameters, value, mode='norm', norm_type=2.0):
        parameters = list(parameters)
        self.clip(parameters, value, mode=mode, norm_type=norm_type)
        grads = [p.grad.detach().float() for p in parameters if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())


@contextlib.contextmanager
def replaced(owner, name: str, replacement):
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield replacement
    finally:
        setattr(owner, name, original)


def count_calls(owner, name: str) -> list:
    """Wrap owner.name so that each call is counted (in the returned list)."""
    calls, original = [], getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(owner, name, counted)
    return calls


def smoke_kwargs(args) -> dict:
    """The smoke run's tiny model arguments (none for the real run, which so needs no pytest)."""
    if not args.smoke:
        return {}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for check_setup's conftest
    from check_setup import SMOKE_KWARGS
    return dict(SMOKE_KWARGS)


def build(args, device: torch.device, runtime):
    torch.manual_seed(0)
    model = timm.create_model('posmlp_t', num_classes=CLASSES, **smoke_kwargs(args)).to(device)
    optimizer = create_optimizer_v2(model, 'adamw', lr=args.lr, weight_decay=0.05)
    model, optimizer, precision = project.resolve_precision(
        device, amp=True, amp_dtype=args.amp_dtype, model=model, optimizer=optimizer)
    ema = ModelEmaV3(model, decay=0.9)
    options = types.SimpleNamespace(ddp_bb=False, dist_bn='reduce', sync_bn=False)
    return model, project.wrap_ddp(model, runtime, options), optimizer, precision, ema


def join_process_group(args):
    """This process's device and its place in the group torchrun set up, as the project's Runtime."""
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = torch.device(args.device)
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend=args.backend)
    return project.Runtime(device, dist.get_rank(), local_rank, dist.get_world_size())


def train_and_measure(args) -> dict:
    runtime = join_process_group(args)
    device = runtime.device
    model, ddp_model, optimizer, precision, ema = build(args, device, runtime)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = coloured_images(args.steps * args.batch_size, smoke_kwargs(args).get('img_size', 224))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        pin_memory=device.type == 'cuda', generator=torch.Generator().manual_seed(0))
    eval_loader = DataLoader(data, batch_size=args.batch_size)
    settings = project.TrainSettings(
        steps=args.steps, grad_accum_steps=args.grad_accum_steps, clip_grad=1.0, clip_mode='norm',
        log_interval=args.steps, autocast=precision.autocast, loss_scaler=precision.loss_scaler)
    micro_steps = count_calls(ddp_model, 'no_sync')
    loss_fn = torch.nn.CrossEntropyLoss()
    before = project.evaluate(model, eval_loader, runtime, precision.autocast)['loss']
    epoch_losses, num_updates = [], 0
    # timm's NativeScaler calls the dispatch_clip_grad of its own module.
    with replaced(timm.utils.cuda, 'dispatch_clip_grad', ClipSpy(timm.utils.cuda.dispatch_clip_grad)) as clipping:
        for epoch in range(args.epochs):
            metrics, num_updates = project.train_one_epoch(
                epoch, ddp_model, loader, optimizer, loss_fn, runtime, settings, model_ema=ema,
                num_updates=num_updates)
            epoch_losses.append(metrics['loss'])
    after = project.evaluate(model, eval_loader, runtime, precision.autocast)['loss']
    reduced = torch.ones(1, device=device)
    dist.all_reduce(reduced)
    return dict(
        backend=dist.get_backend(), world_size=dist.get_world_size(), device=str(device),
        ddp=type(ddp_model).__name__, scaler=type(precision.loss_scaler).__name__, precision=precision.description,
        loss_scale=precision.loss_scaler.state_dict().get('scale') if precision.loss_scaler else None,
        eval_loss_before=before, eval_loss_after=after, epoch_losses=epoch_losses,
        updates=num_updates, expected_updates=args.epochs * math.ceil(args.steps / args.grad_accum_steps),
        no_sync_micro_steps=len(micro_steps), clip_calls=len(clipping.norms),
        max_norm_after_clipping=max((n for n in clipping.norms if math.isfinite(n)), default=float('nan')),
        finite_clip_norms=sum(math.isfinite(n) for n in clipping.norms),
        all_reduce_of_ones=reduced.item(),
        **parameter_changes(model, ema.module, initial),
    )


def parameter_changes(model, ema_model, initial: dict) -> dict:
    params, ema_params = dict(model.named_parameters()), dict(ema_model.named_parameters())
    return dict(
        params=len(params),
        params_changed=sum(not torch.equal(p, initial[n]) for n, p in params.items()),
        ema_changed=sum(not torch.equal(p, initial[n]) for n, p in ema_params.items()),
        ema_differs_from_live=sum(not torch.equal(p, params[n]) for n, p in ema_params.items()),
        non_finite=[n for n, p in params.items() if not torch.isfinite(p).all()]
        + [f'ema.{n}' for n, p in ema_params.items() if not torch.isfinite(p).all()],
    )


def failed_checks(r: dict, args) -> list:
    checks = {
        f'the process group is {args.backend}': r['backend'] == args.backend,
        'the model is wrapped in DistributedDataParallel': r['ddp'] == 'DistributedDataParallel',
        'float16 AMP has a loss scaler': r['scaler'] == 'NativeScaler',
        'the loss scale is finite': r['loss_scale'] is not None and math.isfinite(r['loss_scale']),
        'every epoch loss is finite': all(math.isfinite(v) for v in r['epoch_losses']),
        'the training loss went down (last epoch < first)': r['epoch_losses'][-1] < r['epoch_losses'][0],
        'one update per accumulation group': r['updates'] == r['expected_updates'],
        'no_sync on every micro-step that does not update': (
            r['no_sync_micro_steps'] == args.epochs * args.steps - r['updates']),
        'clipping at every update': r['clip_calls'] == r['updates'],
        'some updates were not skipped by the scaler': r['finite_clip_norms'] > 0,
        'gradients clipped to norm 1.0': r['max_norm_after_clipping'] <= 1.0 + 1e-3,
        'at least 90% of the parameters changed': r['params_changed'] >= 0.9 * r['params'],
        'the EMA moved': r['ema_changed'] >= 0.9 * r['params'],
        'the EMA differs from the live weights': r['ema_differs_from_live'] >= 0.9 * r['params'],
        'no parameter is non-finite': not r['non_finite'],
        'all_reduce works': r['all_reduce_of_ones'] == r['world_size'],
    }
    return [name for name, passed in checks.items() if not passed]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = train_and_measure(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    failed = failed_checks(result, args)
    result['failed_checks'] = failed
    print(json.dumps(result, indent=2))
    if args.result:
        with open(args.result, 'w') as file:
            json.dump(result, file, indent=2)
    if failed:
        print('ddp_step: FAILED: ' + '; '.join(failed), file=sys.stderr)
        return 1
    print('ddp_step: all checks passed')
    return 0


if __name__ == '__main__':
    sys.exit(main())
