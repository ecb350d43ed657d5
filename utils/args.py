"""train.py's options, and the option groups the other scripts share.

Precedence: built-in defaults < a resumed checkpoint's recorded options < config file (`-c FILE`) < command
line. Configs and recorded options are parsed by the same parser as the command line (utils/config.py), so
argparse checks their types, choices, numbers of values and bounds (utils/option_checks.py) alike; what
only the options together can tell is checked here (`check_train_options`). The run's `args.yaml` is itself
a valid config. A config's `data` (the positional root) is read as `data_dir` when it has none; its `resume`
is not read (only a --resume on the command line continues a run), with a warning.
"""
import argparse
import logging
import os
import re
import sys
from typing import Any, Dict, List, Optional

import yaml
from timm.data import create_transform
from timm.optim import get_optimizer_info
from timm.utils import ParseKwargs, reparameterize_model

from models.checkpoint import WEIGHT_SOURCE_ARGS, atomic_file, recorded_model_kwargs
from .config import ConfigurableParser, read_config
from .errors import CheckpointError
from .option_checks import (
    at_least, bad_image_limit, crop_fraction, finite, folder_name, model_name_problem, non_negative,
    normalisation_std, positive, probability, seed_number, smoothing, thread_count, worker_count,
)
from .run_checkpoints import read_resumable
from .weights_choice import resolve_best_from_ema

_logger = logging.getLogger(__name__)

# args.yaml names the config its run was made from; a config does not chain to another.
CONFIG_IGNORED_KEYS = ('config',)
# Config keys that do not become defaults: the data root may come from the command line in two spellings
# (DIR, --data-dir), which are compared with each other, not with the config's; a config that resumed
# would make every run made from it continue one run; and a config's best_from_ema: true asks for ranking
# by the EMA model only while there is one, so --no-model-ema does not clash with it.
CONFIG_HELD_BACK_KEYS = ('data', 'data_dir', 'resume', 'best_from_ema')
# Options of the run a bare --resume continues that it does not take over from the checkpoint: the command line's
# own (resume, config; the data root only when none is given, see parse_train_args), this machine's (device,
# local_rank), and those that would read another file or reach the network (initial_checkpoint: the weights
# come from the checkpoint; log_wandb: on request only). best_from_ema is weighed as a config's is.
RESUME_HELD_BACK_KEYS = ('config', 'resume', 'data', 'data_dir', 'device', 'local_rank', 'initial_checkpoint',
                         'log_wandb', 'best_from_ema')
# The data root DIR is positional: no --option reads it from a mapping, so its value is taken as it is given.
POSITIONAL_DATA_KEY = 'data'
# The resize filters timm's transforms know by name ('random' picks bilinear or bicubic per training image).
INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos')
CROP_MODES = ('center', 'squash', 'border')
AMP_DTYPES = ('float16', 'bfloat16')


def plain(value: Any) -> Any:
    """Tuples become lists all the way down, so the value is plain YAML / weights-only data."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def plain_args(args: argparse.Namespace) -> Dict[str, Any]:
    return plain(vars(args))


def write_args_yaml(args: argparse.Namespace, path: str):
    with atomic_file(path, 'w', encoding='utf-8') as f:
        yaml.safe_dump(plain_args(args), f, sort_keys=False)


class ModelKwargs(ParseKwargs):
    """timm's KEY=VALUE option (values as Python literals where they parse as one, else strings); a word
    without `=` is an error that names it."""

    def __call__(self, parser, namespace, values, option_string=None):
        malformed = [value for value in values if value and '=' not in value]
        if malformed:
            raise argparse.ArgumentError(self, f'{malformed[0]!r} is not KEY=VALUE (e.g. gate=lrpe)')
        super().__call__(parser, namespace, values, option_string)


class MergeKwargs(ModelKwargs):
    """KEY=VALUE options that update the mapping a config file gave, key by key, instead of replacing it:
    `-c configs/quickstart.yaml --model-kwargs gate=lrpe` keeps the config's architecture."""

    def __call__(self, parser, namespace, values, option_string=None):
        base = dict(getattr(namespace, self.dest, None) or {})
        super().__call__(parser, namespace, values, option_string)
        setattr(namespace, self.dest, {**base, **getattr(namespace, self.dest)})


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help that states each option's default once, and truly: "(default: X)" is added unless the help already
    speaks of its default, and left out where there is no value to state (None, '', and SUPPRESS, which the
    second switch of a pair such as --use-ema/--no-ema has, since the first one holds the default)."""

    def _get_help_string(self, action):
        help_text = action.help or ''
        if not action.option_strings or re.search(r'\bdefault\b', help_text, re.IGNORECASE) \
                or action.default in (None, '', argparse.SUPPRESS):
            return help_text
        return help_text + ' (default: %(default)s)'


# On/off options come in pairs, --x and --no-x, so the command line can undo a config's `x: true`.
ON_OFF = dict(action=argparse.BooleanOptionalAction, default=False)


def default_workers() -> int:
    """DataLoader workers per process: the CPUs this process may run on, shared among the processes torchrun
    starts on this node (LOCAL_WORLD_SIZE), less one for the process itself; at least one."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    processes = max(1, int(os.environ.get('LOCAL_WORLD_SIZE') or 1))
    return max(1, cpus // processes - 1)


def add_loader_options(group, per: str):
    """-j, --pin-mem and --prefetcher, shared by train.py, validate.py and inference.py (see utils/loaders.py)."""
    group.add_argument('-j', '--workers', type=worker_count, default=default_workers(),
                       help=f'data loading processes per {per}; the default is the CPUs available to each process '
                            f'on this node, less one')
    group.add_argument('--pin-mem', action=argparse.BooleanOptionalAction, default=None,
                       help='pin CPU memory of batches for faster copies to the GPU; None: on with CUDA')
    group.add_argument('--prefetcher', action=argparse.BooleanOptionalAction, default=None,
                       help="timm's GPU data path: uint8 batches (mixup/cutmix in the collate) copied to the device on "
                            "a side stream, then normalised and random-erased there; --no-prefetcher does all of it "
                            "in the workers and mixes on the device. None: on with CUDA, off on the CPU")


def add_input_options(parser):
    """The evaluation input of validate.py and inference.py: size, crop, resize filter and normalisation
    (utils.data.INPUT_OPTIONS); each overrides what the checkpoint was trained with."""
    parser.add_argument('--img-size', type=at_least(1), default=None, help='input image size')
    parser.add_argument('--input-size', type=at_least(1), nargs=3, default=None, metavar=('C', 'H', 'W'),
                        help='input size')
    parser.add_argument('--crop-pct', type=crop_fraction, default=None, help='center-crop fraction')
    parser.add_argument('--crop-mode', default=None, choices=CROP_MODES, help='how the image is fit to the crop')
    parser.add_argument('--interpolation', default=None, choices=INTERPOLATIONS, help='resize interpolation')
    parser.add_argument('--mean', type=finite, nargs='+', default=None, help='normalisation mean')
    parser.add_argument('--std', type=normalisation_std, nargs='+', default=None, help='normalisation std')


def add_amp_options(parser):
    """--amp and --amp-dtype of the scripts that run a model without training it; naming a type asks for
    autocast (see `amp_requested`)."""
    parser.add_argument('--amp', action='store_true', help='native torch mixed precision')
    parser.add_argument('--amp-dtype', default=None, choices=AMP_DTYPES,
                        help='autocast type; implies --amp (default: bfloat16 on the CPU, float16 on CUDA)')


def amp_requested(args: argparse.Namespace) -> bool:
    return args.amp or args.amp_dtype is not None


def add_reparam_option(parser):
    """--no-reparam for the scripts that run a trained model: by default they run it fused for inference."""
    parser.add_argument('--no-reparam', dest='reparam', action='store_false',
                        help="run the model as trained, without fusing it for inference (timm's reparameterize_model: "
                             "PosMLP's stem BatchNorms folded into its convs, its positional maps made once)")


def inference_form(model, args: argparse.Namespace):
    """The model as the script runs it: in eval mode, fused for inference unless --no-reparam."""
    model = model.eval()
    return reparameterize_model(model, inplace=True) if args.reparam else model


def add_torchcompile_options(parser):
    """--torchcompile [BACKEND] and --torchcompile-mode MODE, as in timm's train.py and validate.py, and
    --no-torchcompile, which undoes a config's torchcompile."""
    parser.add_argument('--torchcompile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                        help='torch.compile the model (backend: inductor unless given)')
    parser.add_argument('--no-torchcompile', dest='torchcompile', action='store_const', const=None,
                        help="don't compile (undoes a config's torchcompile)")
    parser.add_argument('--torchcompile-mode', default=None, metavar='MODE',
                        help="inductor's compile mode, e.g. reduce-overhead or max-autotune (default: torch's)")


def train_parser() -> argparse.ArgumentParser:
    parser = ConfigurableParser(
        prog='train.py',
        description='Train PosMLP (or any timm model) on an image folder, on CPU, one GPU, or many with '
                    'torchrun (distributed_train.sh). Defaults follow the paper\'s PosMLP-T recipe except '
                    'that EMA and AMP are opt-in and there are no cooldown epochs; configs/posmlp_{t,s,b}.yaml '
                    'hold the full recipes.',
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument('-c', '--config', default='', metavar='FILE',
                        help='YAML file of option defaults; command-line options override it')

    group = parser.add_argument_group('Data')
    group.add_argument('data', nargs='?', metavar='DIR', help='data root (same as --data-dir)')
    group.add_argument('--data-dir', default='', metavar='DIR',
                       help='data root: ImageNet layout, train/ and val/ (or validation/), one folder per class')
    group.add_argument('--dataset', default='', metavar='NAME',
                       help="'' for an image folder; 'digits' for scikit-learn's digits, written as an image "
                            "folder into the data dir on first use; or any timm dataset spec (torch/cifar10, ...)")
    group.add_argument('--train-split', default='train', help='training split (folder name)')
    group.add_argument('--val-split', default='validation',
                       help="validation split: a timm dataset spec's split, or the folder under an image-folder root "
                            "(default: val/ or validation/)")
    group.add_argument('--num-classes', type=at_least(1), default=None,
                       help='classes of the model head (default: the number of class folders in train/)')
    group.add_argument('--in-chans', type=at_least(1), default=None, help='image channels (default: 3)')
    group.add_argument('--max-bad-images', type=bad_image_limit, default=None, metavar='N',
                       help='unreadable images that are skipped (with a warning each, all processes together) '
                            'before the run stops (default: 1%% of the split); image folders only')
    group.add_argument('--keep-empty-classes', **ON_OFF,
                       help='keep class folders without images as classes, instead of refusing them')
    add_loader_options(group, 'training process')

    group = parser.add_argument_group('Model')
    group.add_argument('--model', default='posmlp_t', help='timm model name')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=MergeKwargs, metavar='KEY=VALUE',
                       help='more model arguments, values as Python literals: gate=lrpe depths="(2,2,6,2)"; '
                            'they update the config file\'s model_kwargs key by key')
    group.add_argument('--initial-checkpoint', default='', metavar='PATH',
                       help='start from these weights (EMA ones when present); a head of another class '
                            'count is re-initialised (fine-tuning)')
    group.add_argument('--resume', default='', metavar='PATH',
                       help="continue a run from its last.pth.tar: model, optimizer, scheduler, EMA, loss "
                            "scaler and epoch, with the options the checkpoint records unless given here or in -c; "
                            "output goes to the checkpoint's folder unless --output/--experiment name another "
                            "folder than the run was made with")
    group.add_argument('--img-size', type=at_least(1), default=None, help='image size (model and data)')
    group.add_argument('--input-size', type=at_least(1), nargs=3, default=None, metavar=('C', 'H', 'W'),
                       help='input size of the data, overriding --img-size')
    group.add_argument('--crop-pct', type=crop_fraction, default=None,
                       help='eval center-crop fraction (default: model cfg)')
    group.add_argument('--mean', type=finite, nargs='+', default=None, help='normalisation mean (default: model cfg)')
    group.add_argument('--std', type=normalisation_std, nargs='+', default=None,
                       help='normalisation std (default: model cfg)')
    group.add_argument('--interpolation', default='', help='eval resize interpolation (default: model cfg)')
    group.add_argument('--drop', type=probability, default=0.02333, help='dropout rate')
    group.add_argument('--drop-path', type=probability, default=0.1, help='stochastic depth rate')
    group.add_argument('--grad-checkpointing', **ON_OFF, help='recompute activations to save memory')
    group.add_argument('--channels-last', **ON_OFF, help='channels_last memory layout')
    add_torchcompile_options(group)
    group.add_argument('--sync-bn', **ON_OFF, help='synchronised BatchNorm across GPUs')
    group.add_argument('--dist-bn', default='reduce', choices=('reduce', 'broadcast', ''),
                       help='make BatchNorm statistics agree across processes before eval')
    # Off, unlike timm's default (its --no-ddp-bb turns it off): the only buffers that differ between processes
    # are BatchNorm statistics, which --dist-bn reduce averages before every evaluation, as in timm. The others
    # are PosMLP's constant relative-position tables, the same in every process, which broadcasting would send
    # before every forward (about 17 MB for posmlp_t).
    group.add_argument('--ddp-bb', **ON_OFF,
                       help="DDP broadcasts process 0's buffers (BatchNorm statistics, PosMLP's relative-position "
                            "tables) to the others before every forward")

    group = parser.add_argument_group('Batch and optimizer')
    group.add_argument('-b', '--batch-size', type=at_least(1), default=128, help='batch size per process')
    group.add_argument('-vb', '--validation-batch-size', type=at_least(1), default=None,
                       help='eval batch size per process (default: --batch-size)')
    group.add_argument('--grad-accum-steps', type=at_least(1), default=1, help='batches per optimizer update')
    group.add_argument('--opt', default='adamw', help='timm optimizer name')
    group.add_argument('--opt-eps', type=non_negative, default=1e-5, help='optimizer epsilon')
    group.add_argument('--opt-betas', type=float, nargs='+', default=None, metavar='BETA',
                       help="optimizer betas, as many as --opt takes: two for adam(w), lamb, ..., three for adan "
                            "(default: the optimizer's)")
    group.add_argument('--momentum', type=probability, default=0.9, help='SGD momentum')
    group.add_argument('--weight-decay', type=non_negative, default=0.067, help='weight decay')
    group.add_argument('--layer-decay', type=positive, default=None, help='layer-wise lr decay')
    group.add_argument('--clip-grad', type=at_least(0, float, '0 turns clipping off'), default=1.0,
                       help='gradient clipping threshold, 0 or more (none: 0)')
    group.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'), help='gradient clipping mode')

    group = parser.add_argument_group('Learning-rate schedule')
    group.add_argument('--sched', default='cosine', help='timm scheduler: cosine, step, multistep, plateau, ...')
    group.add_argument('--sched-on-updates', **ON_OFF, help='step the schedule every update, not epoch')
    group.add_argument('--lr', type=non_negative, default=2e-3, help='peak learning rate')
    group.add_argument('--epochs', type=at_least(1), default=300, help='epochs of the schedule (cooldown comes on top)')
    group.add_argument('--warmup-epochs', type=at_least(0), default=10, help='linear warmup epochs')
    group.add_argument('--warmup-lr', type=non_negative, default=1e-5, help='learning rate at the start of warmup')
    group.add_argument('--warmup-prefix', **ON_OFF, help='warmup comes before --epochs, not within')
    group.add_argument('--min-lr', type=non_negative, default=1e-6, help='lowest learning rate of the schedule')
    group.add_argument('--cooldown-epochs', type=at_least(0), default=0,
                       help="epochs at --min-lr after the schedule (timm's default; PosMLP-T's recipe has 10)")
    group.add_argument('--decay-epochs', type=positive, default=90, help='step schedule: epochs between decays')
    group.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270],
                       help='multistep schedule: epochs to decay at')
    group.add_argument('--decay-rate', type=positive, default=0.1, help='step/multistep/plateau decay factor')
    group.add_argument('--patience-epochs', type=int, default=10, help='plateau schedule: patience')

    group = parser.add_argument_group('Augmentation and regularisation')
    group.add_argument('--no-aug', action='store_true', help='no training augmentation')
    group.add_argument('--aug', dest='no_aug', action='store_false', default=argparse.SUPPRESS,
                       help="training augmentation, undoing a config's no_aug: true")
    group.add_argument('--scale', type=positive, nargs=2, default=[0.08, 1.0], metavar=('MIN', 'MAX'),
                       help='random-resized-crop area range')
    group.add_argument('--ratio', type=positive, nargs=2, default=[3. / 4., 4. / 3.], metavar=('MIN', 'MAX'),
                       help='random-resized-crop aspect ratio range')
    group.add_argument('--hflip', type=probability, default=0.5, help='horizontal flip probability')
    group.add_argument('--vflip', type=probability, default=0., help='vertical flip probability')
    group.add_argument('--color-jitter', type=non_negative, default=0.4, help='colour jitter strength')
    group.add_argument('--aa', default='rand-m6-n3-mstd1.0-inc1', metavar='POLICY',
                       help="RandAugment ('rand-...') or AutoAugment ('original', 'v0', ...) policy; '' for none")
    group.add_argument('--train-interpolation', default='random', help='training resize interpolation')
    group.add_argument('--reprob', type=probability, default=0., help='random erasing probability')
    group.add_argument('--remode', default='pixel', type=str.lower, choices=('const', 'rand', 'pixel'),
                       help='random erasing fill')
    group.add_argument('--recount', type=int, default=1, help='random erasing regions')
    group.add_argument('--mixup', type=non_negative, default=0.5, help='mixup alpha (0: off)')
    group.add_argument('--cutmix', type=non_negative, default=1.0, help='cutmix alpha (0: off)')
    group.add_argument('--cutmix-minmax', type=probability, nargs=2, default=None, help='cutmix box ratio range')
    group.add_argument('--mixup-prob', type=probability, default=1.0, help='probability of mixing a batch')
    group.add_argument('--mixup-switch-prob', type=probability, default=0.5, help='probability of cutmix over mixup')
    group.add_argument('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'), help='mixup granularity')
    group.add_argument('--mixup-off-epoch', type=int, default=0, help='stop mixing from this epoch (0: never)')
    group.add_argument('--smoothing', type=smoothing, default=0.1, help='label smoothing')
    group.add_argument('--bce-loss', **ON_OFF, help='binary cross-entropy instead of cross-entropy')

    group = parser.add_argument_group('Model EMA')
    group.add_argument('--model-ema', **ON_OFF, help='keep an exponential moving average of the weights')
    group.add_argument('--model-ema-decay', type=probability, default=0.99992, help='EMA decay per update')
    group.add_argument('--model-ema-warmup', **ON_OFF, help='ramp the EMA decay up over early updates')
    group.add_argument('--best-from-ema', action=argparse.BooleanOptionalAction, default=None,
                       help="rank checkpoints and model_best by the EMA model's eval metric, the weights eval.sh "
                            "evaluates (default: on exactly when --model-ema is, as in timm and the authors' code); "
                            "--no-best-from-ema ranks by the live model")

    group = parser.add_argument_group('Precision')
    group.add_argument('--amp', **ON_OFF, help='native torch mixed precision')
    group.add_argument('--native-amp', **ON_OFF, help='same as --amp (--no-amp leaves it on)')
    group.add_argument('--apex-amp', **ON_OFF,
                       help='NVIDIA apex mixed precision when apex is installed, else native AMP (with a warning)')
    group.add_argument('--amp-dtype', default=None, choices=AMP_DTYPES,
                       help='autocast type (default: float16 on CUDA, bfloat16 on the CPU)')

    group = parser.add_argument_group('Run')
    group.add_argument('--device', default=None, help='cuda, cuda:N or cpu (default: cuda when available)')
    group.add_argument('--threads', type=thread_count, default=0,
                       help="torch CPU threads per process (0: torch's default). Small models on few cores "
                            "run fastest with 1: splitting tiny operations costs more than it saves")
    group.add_argument('--local-rank', '--local_rank', type=int, default=None, metavar='N',
                       help='ignored; accepted because `python -m torch.distributed.launch` passes it. Each '
                            'process takes its GPU from the LOCAL_RANK environment variable, which that launcher '
                            'and torchrun (distributed_train.sh) set')
    group.add_argument('--dist-backend', default=None,
                       help='torch.distributed backend (default: nccl on GPUs, gloo on CPU)')
    group.add_argument('--seed', type=seed_number, default=42, help='random seed (offset by the rank)')
    group.add_argument('--log-interval', type=at_least(1), default=50,
                       help='batches between progress lines and, with several processes, between counts of '
                            'unreadable images over all of them')
    group.add_argument('--checkpoint-hist', type=at_least(0, note='0 keeps no epoch checkpoints'), default=10,
                       help='best epoch checkpoints to keep')
    group.add_argument('--output', default='', metavar='DIR',
                       help='parent folder of run folders (default: ./output/train)')
    group.add_argument('--experiment', type=folder_name, default='',
                       help='run folder name (default: date-time-model-size)')
    group.add_argument('--eval-metric', default='top1', choices=('top1', 'top5', 'loss'),
                       help='the metric that ranks checkpoints and picks model_best')
    group.add_argument('--log-wandb', **ON_OFF, help='also log to Weights & Biases (if installed)')
    group.add_argument('--max-steps-per-epoch', type=at_least(0, note='0 runs whole epochs'), default=0, metavar='N',
                       help='stop each epoch after N batches (0: whole epoch); for smoke tests')
    return parser


def check_torchcompile(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Stop with the option named when --torchcompile's backend or mode is not one torch.compile knows."""
    if args.torchcompile_mode and args.torchcompile != 'inductor':
        parser.error(f'--torchcompile-mode {args.torchcompile_mode} is a mode of the inductor backend: give '
                     f'--torchcompile (inductor is its default) or leave the mode out.')
    if not args.torchcompile:
        return
    import torch  # list_backends loads torch._dynamo, which is slow: only when compiling
    if args.torchcompile not in torch.compiler.list_backends(exclude_tags=()):
        parser.error(f'--torchcompile {args.torchcompile}: no such torch.compile backend; give one of '
                     f'{", ".join(torch.compiler.list_backends())}.')
    if args.torchcompile_mode:
        import torch._inductor  # where torch.compile's documentation lists the modes; no public name has them
        modes = torch._inductor.list_mode_options()
        if args.torchcompile_mode not in modes:
            parser.error(f'--torchcompile-mode {args.torchcompile_mode}: no such mode; give one of '
                         f'{", ".join(modes)}.')


def check_opt_betas(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Stop unless --opt-betas gives as many betas as --opt takes (timm would drop them, or fail on indexing)."""
    if args.opt_betas is None:
        return
    try:
        # timm names the optimizer by the last part of --opt: lookahead_adamw is adamw.
        info = get_optimizer_info(args.opt.lower().split('_')[-1])
    except ValueError:
        return  # an unknown --opt is reported when the optimizer is made
    if not info.has_betas:
        parser.error(f'--opt {args.opt} takes no betas; leave --opt-betas out.')
    if len(args.opt_betas) != info.num_betas:
        given = ' '.join(f'{beta:g}' for beta in args.opt_betas)
        parser.error(f'--opt {args.opt} takes {info.num_betas} betas, not {len(args.opt_betas)} ({given}); '
                     f'give --opt-betas {info.num_betas} numbers.')


def check_transform_options(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Stop with the option named when timm's transforms would refuse it later with a bare KeyError or
    AssertionError: a filter or augmentation policy it does not know, or a mean/std of the wrong length."""
    for option, value, also in (('--interpolation', args.interpolation, ('',)),
                                ('--train-interpolation', args.train_interpolation, ('random',))):
        if value not in INTERPOLATIONS + also:
            names = ', '.join(name for name in INTERPOLATIONS + also if name)
            parser.error(f'{option} {value}: not a resize filter; give one of {names}.')
    if args.aa:
        try:
            create_transform(8, is_training=True, auto_augment=args.aa)
        except (AssertionError, ValueError, KeyError, IndexError) as e:
            parser.error(f'--aa {args.aa}: not an augmentation policy timm knows ({e or type(e).__name__}); e.g. '
                         f'rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original or v0, or \'\' for none.')
    channels = args.input_size[0] if args.input_size else args.in_chans or 3
    for option, values in (('--mean', args.mean), ('--std', args.std)):
        if values is not None and len(values) not in (1, channels):
            parser.error(f'{option} takes 1 value or {channels} (one per image channel), not {len(values)}.')


def check_train_options(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Stop with the options named when they cannot work together (each value alone was checked as parsed)."""
    check_transform_options(parser, args)
    fetching = sorted(k for k in WEIGHT_SOURCE_ARGS if args.model_kwargs.get(k))
    if fetching:
        parser.error(f'--model-kwargs {", ".join(fetching)}: nothing is downloaded or read besides the options\' '
                     f'files; to start from other weights, pass their file as --initial-checkpoint FILE.')
    check_opt_betas(parser, args)
    check_torchcompile(parser, args)
    if args.cutmix_minmax is not None and args.cutmix_minmax[0] >= args.cutmix_minmax[1]:
        parser.error(f'--cutmix-minmax {args.cutmix_minmax[0]:g} {args.cutmix_minmax[1]:g}: give the smaller box '
                     f'ratio first, e.g. --cutmix-minmax 0.2 0.8.')
    mixing = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixing and args.batch_size % 2:
        parser.error(f'mixup/cutmix mix each batch with its mirror, so -b/--batch-size must be even, '
                     f'not {args.batch_size}.')
    problem = model_name_problem(args.model)
    if problem:
        parser.error(f'--model {args.model}: {problem} PosMLP models are posmlp_t/s/b and posmlp_{{t,s,b}}_lrpe/_sgu.')
    if 0 < args.epochs <= args.warmup_epochs:
        _logger.warning(f'--warmup-epochs {args.warmup_epochs} is not shorter than --epochs {args.epochs}: the learning '
                        f'rate never leaves its warm-up from --warmup-lr {args.warmup_lr:g} to --lr; for a short run, '
                        f'give fewer warm-up epochs.')


def config_options(parser: ConfigurableParser, argv: List[str]) -> Dict[str, Any]:
    """The options that the config file named by -c/--config sets, parsed (the positional data root as it is)."""
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument('-c', '--config', default='')
    path = finder.parse_known_args(argv)[0].config
    if not path:
        return {}
    config = {key: value for key, value in read_config(parser, path).items()
              if str(key).replace('-', '_') not in CONFIG_IGNORED_KEYS}
    data = config.pop(POSITIONAL_DATA_KEY, None)
    return dict(parser.parse_mapping(config, f'config {path}'), data=data)


def recorded_options(parser: ConfigurableParser, argv: List[str]) -> Dict[str, Any]:
    """The options recorded in the checkpoint that --resume names, if any, parsed: a resumed run continues with
    them unless a config or the command line gives others. A checkpoint that cannot be resumed gives none here;
    the run reports why before it makes its folder."""
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument('--resume', default='')
    path = finder.parse_known_args(argv)[0].resume
    try:
        recorded = read_resumable(path, mmap=True)['args'] if path else {}
    except (CheckpointError, OSError):
        return {}
    known = parser.option_defaults()
    unknown = sorted(str(key) for key in recorded if key not in known)
    if unknown:
        _logger.warning(f'{path} records options this {parser.prog} does not have, which are ignored: '
                        f'{", ".join(unknown)}.')
    options = {key: value for key, value in recorded.items() if key in known and key != POSITIONAL_DATA_KEY}
    if 'model_kwargs' in options:
        options['model_kwargs'] = recorded_model_kwargs(options['model_kwargs'], path)
    return dict(parser.parse_mapping(options, f'{path} (its recorded options)'), data=recorded.get('data'))


def resolve_data_root(parser: argparse.ArgumentParser, args: argparse.Namespace, config: Dict[str, Any]) -> str:
    """The data root: DIR or --data-dir from the command line (given twice, they must agree), else the
    config's `data_dir`, else its `data` (args.yaml records both, with the same value)."""
    if args.data and args.data_dir and args.data != args.data_dir:
        parser.error(f'the data root is given twice, as {args.data} and as --data-dir {args.data_dir}; give it once.')
    from_config, positional = config.get('data_dir'), config.get('data')
    if from_config and positional and from_config != positional:
        parser.error(f'config {args.config} gives the data root twice, as data: {positional} and as data_dir: '
                     f'{from_config}; keep one of the two keys.')
    return args.data or args.data_dir or from_config or positional or ''


def warn_of_config_resume(parser: argparse.ArgumentParser, args: argparse.Namespace, config: Dict[str, Any]):
    """A config's `resume` (args.yaml of a resumed run records one) does not continue that run; say so
    unless the command line resumes."""
    if config.get('resume') and not args.resume:
        print(f'{parser.prog}: warning: config {args.config} has resume: {config["resume"]}, but configs do not '
              f'resume runs, so this run starts afresh. To continue that run, give --resume {config["resume"]} '
              f'on the command line.', file=sys.stderr)


def parse_train_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = train_parser()
    config = config_options(parser, argv)
    recorded = recorded_options(parser, argv)
    parser.set_defaults(**{k: v for k, v in recorded.items() if k not in RESUME_HELD_BACK_KEYS})
    parser.set_defaults(**{k: v for k, v in config.items() if k not in CONFIG_HELD_BACK_KEYS})
    args = parser.parse_args(argv)
    args.data_dir = resolve_data_root(parser, args, config) or recorded.get('data_dir') or recorded.get('data') or ''
    if recorded.get('model_ema') and recorded.get('best_from_ema') is False:
        config.setdefault('best_from_ema', False)  # the resumed run ranked an EMA run by its live model
    warn_of_config_resume(parser, args, config)
    check_train_options(parser, args)
    resolve_best_from_ema(parser, args, config)
    return args
