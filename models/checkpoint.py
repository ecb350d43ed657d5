"""Checkpoint files: read them without running code, write them atomically, build models from them.

A checkpoint is either the authors' training format (`state_dict`, `state_dict_ema`, `args` as an
argparse.Namespace, their parameter names) or this project's (the same keys plus `model_name` and
`model_kwargs`, everything plain data), or a bare state dict. All load with `weights_only=True`.
A `.safetensors` file holds one state dict, and the plain data beside it as JSON in its metadata; it
reads as `{'state_dict': weights, **that data}`.
"""
import argparse
import contextlib
import errno
import json
import logging
import math
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import safetensors
import safetensors.torch
import timm
import torch
from timm.data.transforms import str_to_interp_mode
from timm.layers import to_2tuple
# What timm's builder does to a feature backbone's cfg; timm exports no public name for it.
from timm.models._builder import pretrained_cfg_for_features
from torch import nn

from utils.errors import CheckpointError
from utils.weights_choice import WEIGHT_KEYS, select_state_dict

from . import eamlp, vip
from .posmlp import VARIANT_EMBED_DIMS, PosMLP, checkpoint_filter_fn

_logger = logging.getLogger(__name__)

# The umask can only be read by setting it; done once at import, before any thread could create files meanwhile.
PROCESS_UMASK = os.umask(0)
os.umask(PROCESS_UMASK)
# The first bytes of a zip archive, the format torch.save writes since PyTorch 1.6.
ZIP_MAGIC = b'PK\x03\x04'
SAFETENSORS_SUFFIX = '.safetensors'
# The safetensors metadata entry (a JSON object) that holds a file's plain data: model name, arguments, class map.
SAFETENSORS_DATA_KEY = 'checkpoint'

__all__ = [
    'CheckpointError', 'LoadedCheckpoint', 'atomic_file', 'create_model_from_checkpoint', 'infer_model_kwargs',
    'load_checkpoint_file', 'load_weights', 'read_checkpoint', 'recorded_model_kwargs', 'save_checkpoint_file',
    'select_state_dict',
]


def load_checkpoint_file(path: str, mmap: bool = False) -> Any:
    """torch.load with weights_only=True; the authors' argparse.Namespace `args` is allowed.

    `mmap` maps the tensors instead of reading them (zip-format files only), for callers that only
    look at a few small entries of a big checkpoint.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path!r} does not exist (or is not a file); check the path.')
    if path.endswith(SAFETENSORS_SUFFIX):
        return _load_safetensors_file(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        # A zip archive that ends early can make torch's reader seek past the end (EINVAL); other OS errors are real.
        if isinstance(e, OSError) and e.errno != errno.EINVAL:
            raise
        message = str(e)
        if mmap and 'mmap can only be used' in message:  # a file in torch's pre-1.6 format: read it whole
            return load_checkpoint_file(path)
        # The weights-only unpickler refuses what a pickle would call, naming it (in wordings that vary);
        # bytes that are no pickle at all ("Unsupported operand") or end early mean a damaged file.
        unsafe = re.search(r'GLOBAL (\S+)', message, re.IGNORECASE)
        refused = message.startswith('Weights only load failed') and 'Unsupported operand' not in message
        if unsafe or refused:
            called = unsafe.group(1) if unsafe else 'something other than tensors and plain data'
            raise CheckpointError(
                f'refusing to load {path!r}: unpickling it would call {called}, i.e. run code from the file. '
                f'Only weights-only checkpoints are loaded; if you trust the file, re-save its state_dict with '
                f'plain types.') from None
        with open(path, 'rb') as f:
            start = f.read(16)
        if start.startswith(ZIP_MAGIC):
            raise CheckpointError(
                f'{path!r} looks like a truncated or incomplete PyTorch checkpoint: it starts as one (a zip archive) '
                f'but cannot be read ({os.path.getsize(path):,} bytes). Compare its size with the original\'s and '
                f'copy or download it again.') from None
        raise CheckpointError(
            f'{path!r} is not a PyTorch checkpoint ({os.path.getsize(path):,} bytes starting {start!r}): a truncated '
            f'download, or an HTML page saved in its place? Look at it with `head -c 200 {path}` and compare its '
            f'size with the original\'s, then download it again.') from None


def _load_safetensors_file(path: str) -> dict:
    """{'state_dict': the file's tensors, **the plain data its metadata holds}. safetensors reads only
    tensors and a JSON header, so nothing in the file can run code."""
    try:
        with safetensors.safe_open(path, framework='pt', device='cpu') as f:
            metadata = f.metadata() or {}
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except safetensors.SafetensorError as e:
        raise CheckpointError(
            f'{path!r} is not a readable safetensors file ({e}; {os.path.getsize(path):,} bytes): a truncated '
            f'download, or another format under this name? Compare its size with the original\'s and copy it again.'
        ) from None
    try:
        data = json.loads(metadata.get(SAFETENSORS_DATA_KEY, '{}'))
    except (ValueError, RecursionError) as e:
        reason = 'nested too deeply to read' if isinstance(e, RecursionError) else f'not JSON ({e})'
        raise CheckpointError(f'{path!r}: the {SAFETENSORS_DATA_KEY!r} entry of its metadata is {reason}; '
                              f'the file was altered. Use the original file.') from None
    if not isinstance(data, dict):
        raise CheckpointError(f'{path!r}: the {SAFETENSORS_DATA_KEY!r} entry of its metadata is not a JSON object; '
                              f'the file was altered. Use the original file.')
    data = {k: v for k, v in data.items() if k not in WEIGHT_KEYS}  # its plain data may not claim weights
    return dict(data, state_dict=state_dict)


def _safetensors_bytes(obj: dict) -> bytes:
    """A checkpoint as safetensors: its `state_dict` (or obj itself, when all tensors) as the tensors,
    everything else as JSON in the metadata."""
    if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
        state_dict, data = obj['state_dict'], {k: v for k, v in obj.items() if k != 'state_dict'}
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state_dict, data = obj, {}
    else:
        raise CheckpointError('a .safetensors file holds a state dict (a dict of tensors), alone or as the '
                              '`state_dict` of a dict of plain data.')
    try:
        metadata = {'format': 'pt', SAFETENSORS_DATA_KEY: json.dumps(data)}
    except TypeError as e:
        raise CheckpointError(f'a .safetensors file holds one state dict and plain data beside it (JSON); '
                              f'{e}. Write a .pth file, or keep only the weights wanted and plain data.') from None
    return safetensors.torch.save({k: v.contiguous() for k, v in state_dict.items()}, metadata=metadata)


# Temporary files are named `.tmp-XXXXXXXX-<name>` (X: tempfile's random characters) beside the file they become.
TEMPORARY_PREFIX = '.tmp-'


def os_error_behind(error: BaseException) -> Optional[OSError]:
    """The OSError that caused `error`: torch.save reports a failed write (a full disk) as a RuntimeError
    raised while handling it."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


@contextlib.contextmanager
def atomic_file(path: str, mode: str = 'wb', **open_kwargs):
    """A file object whose contents replace `path` only once they are whole: written to a temporary file in
    the same folder, synced, then renamed over `path`. A failure leaves `path` as it was and removes the
    temporary file, and re-raises the OSError behind it with `path` named; kill -9 can still leave the
    temporary file, which utils.run_checkpoints removes from run folders.

    The file gets the permissions the process's umask gives new files, as a plain open() would.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix=f'-{os.path.basename(path)}', dir=folder)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file private (0600); give it the mode a plain open() would, so others may read it.
        os.chmod(tmp, 0o666 & ~PROCESS_UMASK)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = os_error_behind(e)
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror, path if cause.filename in (None, tmp) else cause.filename) from None


def save_checkpoint_file(obj: Any, path: str):
    """torch.save through `atomic_file`: a crash or a full disk never leaves a half-written `path`.

    A path ending `.safetensors` gets safetensors instead (see `_safetensors_bytes`).
    """
    with atomic_file(path) as f:
        if path.endswith(SAFETENSORS_SUFFIX):
            f.write(_safetensors_bytes(obj))
        else:
            torch.save(obj, f)


@dataclass
class LoadedCheckpoint:
    """The weights chosen from a checkpoint file, and what the file says about its model."""
    path: str
    state_dict: Dict[str, torch.Tensor]
    weights: str  # which entry the weights came from: 'state_dict_ema' or 'state_dict'
    model_name: Optional[str] = None
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    epoch: Optional[int] = None
    metric: Optional[float] = None
    args: Dict[str, Any] = field(default_factory=dict)  # the training options, as plain data
    class_to_idx: Optional[Dict[str, int]] = None  # class folder name -> label, as train.py stores it


# Model arguments that say where weights come from or how the model is used, not what it is. A checkpoint is data:
# its recorded arguments never pass these on (pretrained=True with a pretrained_cfg makes timm read another file
# or reach the network), nor any value that names a file, URL or hub id.
NON_ARCHITECTURE_RECORDS = (
    'pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'pretrained_strict', 'checkpoint_path', 'cache_dir',
    'features_only', 'out_indices', 'feature_cls', 'feature_cfg',
)
# A path (a separator, ~, a scheme or hub prefix such as hf-hub:) or a weights file's extension.
LOCATION = re.compile(r'[/\\:~]|\.(pth|pt|bin|tar|safetensors|ckpt|npz|h5|pkl|onnx)$', re.IGNORECASE)


def _names_location(value: Any) -> bool:
    """Whether `value` (plain data, possibly nested) holds something other than names and numbers: a string
    that looks like a file, URL or hub id, or a tensor."""
    if isinstance(value, str):
        return bool(LOCATION.search(value))
    if isinstance(value, (list, tuple)):
        return any(map(_names_location, value))
    if isinstance(value, dict):
        return any(_names_location(k) or _names_location(v) for k, v in value.items())
    return not (value is None or isinstance(value, (bool, int, float)))


def recorded_model_kwargs(kwargs: Any, source: str) -> Dict[str, Any]:
    """The architecture arguments among a checkpoint's recorded model arguments (`source` names the file).

    The others (NON_ARCHITECTURE_RECORDS, and any value naming a file, URL or hub id) are dropped with a
    warning: building the recorded model must never load other weights or fetch anything."""
    if not isinstance(kwargs, dict):
        if kwargs is not None:
            _logger.warning(f'{source}: its recorded model arguments are not a mapping ({type(kwargs).__name__}); '
                            f'they are ignored.')
        return {}
    kept = {k: v for k, v in kwargs.items()
            if isinstance(k, str) and k not in NON_ARCHITECTURE_RECORDS and not _names_location(v)}
    dropped = [str(k) for k in kwargs if k not in kept]
    if dropped:
        _logger.warning(
            f'{source}: recorded model arguments {", ".join(dropped)} ignored: a checkpoint only describes its '
            f'architecture, and these would load weights from elsewhere, fetch something, or change how the model '
            f'is used. Pass them yourself if you mean them.')
    return kept


def _numbers(value: Any, count: Optional[int] = None, whole: bool = False, least: float = -math.inf) -> bool:
    """Whether `value` is a non-empty list of `count` finite numbers (whole ones if asked), each >= `least`."""
    kinds = (int,) if whole else (int, float)
    return isinstance(value, (list, tuple)) and len(value) > 0 and count in (None, len(value)) and all(
        isinstance(v, kinds) and not isinstance(v, bool) and math.isfinite(v) and v >= least for v in value)


def _interpolation(value: Any) -> bool:
    try:
        str_to_interp_mode(value)
    except (KeyError, TypeError):
        return False
    return True


# The recorded training options evaluation takes its input from, and what each must be to be used.
RECORDED_INPUT_OPTIONS = {
    'input_size': lambda v: _numbers(v, 3, whole=True, least=1),
    'img_size': lambda v: _numbers([v], whole=True, least=1) or _numbers(v, 2, whole=True, least=1),
    'in_chans': lambda v: _numbers([v], whole=True, least=1),
    'crop_pct': lambda v: _numbers([v], least=1e-6),
    'crop_mode': lambda v: isinstance(v, str),
    'interpolation': _interpolation,
    'mean': _numbers,
    'std': lambda v: _numbers(v, least=1e-12),
}
# The options that set a model's input (size, crop, resize filter, normalisation): train.py records them, validate.py
# and inference.py take them, and weights files keep them.
INPUT_OPTIONS = tuple(RECORDED_INPUT_OPTIONS)


def recorded_args(args: Any, source: str) -> Dict[str, Any]:
    """A checkpoint's recorded training options as a dict (the authors' argparse.Namespace too); input options
    whose values no transform could use are dropped with a warning (`source` names the file)."""
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, dict) else {}
    unusable = [k for k, usable in RECORDED_INPUT_OPTIONS.items()
                if args.get(k) is not None and args.get(k) != '' and not usable(args[k])]
    if unusable:
        _logger.warning(f'{source}: recorded input options ' + ', '.join(f'{k}={args[k]!r}' for k in unusable)
                        + ' ignored: no transform can use them; the model\'s defaults (or the options given) apply.')
    return {k: v for k, v in args.items() if k not in unusable}


def read_checkpoint(path: str, use_ema: Optional[bool] = None) -> LoadedCheckpoint:
    """Read a checkpoint file and pick its EMA (default when present) or live weights."""
    checkpoint = load_checkpoint_file(path)
    state_dict, weights = select_state_dict(checkpoint, use_ema)
    model_name = checkpoint.get('model_name') if isinstance(checkpoint.get('model_name'), str) else None
    args = recorded_args(checkpoint.get('args'), path)
    return LoadedCheckpoint(
        path=path,
        state_dict=checkpoint_filter_fn(state_dict),
        weights=weights,
        model_name=model_name,
        model_kwargs=recorded_model_kwargs(checkpoint.get('model_kwargs'), path),
        epoch=checkpoint.get('epoch'),
        metric=checkpoint.get('metric'),
        args=args,
        class_to_idx=dict(checkpoint['class_to_idx']) if isinstance(checkpoint.get('class_to_idx'), dict) else None,
    )


def _stage_indices(state_dict, pattern):
    return sorted({int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))})


def infer_model_kwargs(state_dict: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """The architecture arguments of PosMLP that a state dict (project names) was made with."""
    stages = _stage_indices(state_dict, r'stages\.(\d+)\.blocks\.')
    if not stages or 'stem.conv1.weight' not in state_dict:
        raise CheckpointError('these weights are not a PosMLP model (they have no stem.conv1 / stages.*.blocks.* '
                              'weights), the only one whose arguments can be read off its weights.')
    kw = dict(embed_dims=[], depths=[], mlp_ratio=[], gamma=[], win_size=[])
    gate, generalized = 'gqpe', True
    for i in stages:
        prefix = f'stages.{i}.blocks.'
        depth = len(_stage_indices(state_dict, re.escape(prefix) + r'(\d+)\.'))
        dim = state_dict[prefix + '0.norm.weight'].shape[0]
        hidden = state_dict[prefix + '0.fc1.weight'].shape[0]
        if prefix + '0.gate.proj.weight' in state_dict:
            gate, gamma = 'sgu', 1
            num_tokens = state_dict[prefix + '0.gate.proj.weight'].shape[0]
        else:
            num_tokens = state_dict[prefix + '0.gate.token_bias'].shape[1]
            if prefix + '0.gate.pos.table' in state_dict:
                gate, gamma = 'lrpe', state_dict[prefix + '0.gate.pos.table'].shape[1]
            else:
                gamma = state_dict[prefix + '0.gate.pos.centers'].shape[0]
                generalized = state_dict[prefix + '0.gate.pos.spreads'].dim() == 3
        kw['embed_dims'].append(dim)
        kw['depths'].append(depth)
        kw['mlp_ratio'].append(hidden / dim if hidden % dim else hidden // dim)
        kw['gamma'].append(gamma)
        kw['win_size'].append(int(round(num_tokens ** 0.5)))
    kw = {k: tuple(v) for k, v in kw.items()}
    if gate == 'sgu':
        kw.pop('gamma')
    kw.update(
        gate=gate, generalized=generalized,
        in_chans=state_dict['stem.conv1.weight'].shape[1],
        num_classes=state_dict['head.weight'].shape[0] if 'head.weight' in state_dict else 0,
    )
    return kw


def _registered_name(model_kwargs: Dict[str, Any]) -> str:
    """The registered PosMLP name for an inferred architecture: the size (T, S, B) whose widths it has,
    T's when none matches (the kwargs then set the widths), and the gate's suffix."""
    widths = tuple(model_kwargs['embed_dims'])
    size = next((s for s, dims in VARIANT_EMBED_DIMS.items() if dims == widths), 't')
    gate = model_kwargs.get('gate', 'gqpe')
    return f'posmlp_{size}' + ('' if gate == 'gqpe' else f'_{gate}')


def _read_posmlp_architecture(state_dict: Dict[str, torch.Tensor]) -> Optional[tuple]:
    """(registered name, model arguments) of the PosMLP whose weights these are; None for another model's."""
    try:
        kwargs = infer_model_kwargs(checkpoint_filter_fn(state_dict))
    except CheckpointError:
        return None
    return _registered_name(kwargs), kwargs


# The model families whose architecture can be read off their weights. Each gives a reader (a state dict in
# its authors' names or this project's -> (registered name, model arguments), or None for weights of another
# model) and the checkpoint filter that maps its authors' names to this project's.
FAMILIES = {
    PosMLP: (_read_posmlp_architecture, checkpoint_filter_fn),
    vip.VisionPermutator: (vip.read_architecture, vip.checkpoint_filter_fn),
    eamlp.EAMLP: (eamlp.read_architecture, eamlp.checkpoint_filter_fn),
}


def _listing(keys, limit=6):
    keys = list(keys)
    return ', '.join(keys[:limit]) + (f' ... ({len(keys)} in all)' if len(keys) > limit else '')


# What a mismatch hint says when the caller knows no better (train.py --initial-checkpoint builds its --model).
BUILD_MATCHING_MODEL = ('Build the model the checkpoint was made for (train.py: the --model and --model-kwargs '
                        'it was trained with).')


def _classifier_prefixes(model: nn.Module) -> tuple:
    """Key prefixes of the model's classifier, as timm records it ('head' for PosMLP, 'fc' for ResNets)."""
    names = getattr(model, 'pretrained_cfg', {}).get('classifier') or 'head'
    return tuple(f'{name}.' for name in ((names,) if isinstance(names, str) else names))


def load_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str = 'checkpoint',
                 finetune: bool = False, hint: str = BUILD_MATCHING_MODEL):
    """Load weights strictly; a head of another class count is reset (with a warning) only if finetune.

    A model without a head (num_classes=0, a backbone) takes all weights but the head's, as in timm.
    The body is checked before the head, so a model of another architecture is named as such (`hint`
    says how to build the right one) rather than as another class count.
    """
    # Other models' names are left as they are but for DDP's prefix, which PosMLP's filter drops too.
    _, filter_fn = FAMILIES.get(type(model), (None, checkpoint_filter_fn))
    try:
        state_dict = filter_fn(state_dict, model)
    except ValueError as e:  # window-sized weights that cannot be resampled to the model's windows
        raise CheckpointError(f'{source} does not fit this model: {e}') from None
    own = model.state_dict()
    head = _classifier_prefixes(model)
    if not any(k.startswith(head) for k in own):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(head)}

    def in_body(key):
        return not key.startswith(head)

    missing = [k for k in own if k not in state_dict and in_body(k)]
    unexpected = [k for k in state_dict if k not in own and in_body(k)]
    mismatched = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}'
                  for k in state_dict if k in own and in_body(k) and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = [f'missing keys: {_listing(missing)}' if missing else '',
                 f'unexpected keys: {_listing(unexpected)}' if unexpected else '',
                 f'shape mismatches (checkpoint vs model): {_listing(mismatched, 3)}' if mismatched else '']
        raise CheckpointError(
            f'{source} does not fit this model ({type(model).__name__}); it was made for another architecture. '
            + '; '.join(p for p in parts if p) + f'. {hint}')

    own_head = {k: v.shape for k, v in own.items() if not in_body(k)}
    their_head = {k: v.shape for k, v in state_dict.items() if not in_body(k)}
    if own_head != their_head:
        own_weight = next((shape for k, shape in own_head.items() if k.endswith('.weight')), None)
        their_weight = next((shape for k, shape in their_head.items() if k.endswith('.weight')), None)
        theirs = their_weight[0] if their_weight is not None else 0
        if not finetune:
            if own_weight is not None and their_weight is not None and own_weight[1:] != their_weight[1:]:
                raise CheckpointError(
                    f'{source} does not fit this model ({type(model).__name__}): its classifier takes '
                    f'{tuple(their_weight[1:])} features but the model\'s takes {tuple(own_weight[1:])} '
                    f'(classifier weight {tuple(their_weight)} vs {tuple(own_weight)}); it was made for another '
                    f'architecture. {hint}')
            raise CheckpointError(
                f'{source} has a {theirs}-class head but the model has {getattr(model, "num_classes", "?")} '
                f'classes. To fine-tune, load it with finetune=True (train.py --initial-checkpoint does) and the '
                f'head is re-initialised; to evaluate, build the model with num_classes={theirs} '
                f'(validate.py: --model-kwargs num_classes={theirs}).')
        _logger.warning(f'{source}: {theirs}-class head dropped; the new head of {model.num_classes} '
                        f'classes starts from its initialisation (fine-tuning).')
        state_dict = {k: v for k, v in state_dict.items() if in_body(k)}
        model.load_state_dict(state_dict, strict=False)
    else:
        model.load_state_dict(state_dict)


# Arguments that make timm load weights of its own, which create_model_from_checkpoint refuses: its weights
# come from the checkpoint.
WEIGHT_SOURCE_ARGS = ('pretrained', 'pretrained_cfg', 'checkpoint_path', 'cache_dir')
# pretrained_cfg entries that tell timm where weights are; the feature backbone's weights are given as state_dict.
WEIGHT_LOCATIONS = ('source', 'file', 'url', 'hf_hub_id', 'hf_hub_filename', 'state_dict')
# Arguments of a feature backbone (features_only=True): timm takes them when it wraps the loaded model.
FEATURE_ARGS = ('out_indices', 'feature_cls', 'feature_cfg')
# Arguments that never make weights unfit, left out of a hint naming the ones that did
# (a different num_classes gets its own message from load_weights).
NON_ARCHITECTURE_ARGS = ('features_only', 'pretrained_cfg_overlay', *FEATURE_ARGS, 'num_classes', 'drop_rate',
                         'drop_path_rate', 'drop_block_rate', 'gate_impl')


def _described_model(checkpoint: LoadedCheckpoint) -> tuple:
    """(timm name, model arguments) of the model a checkpoint describes: the ones it records, else the PosMLP,
    ViP or EAMLP its weights show (the authors' checkpoints record none, or an `arch` name of their own).
    Raises CheckpointError when it describes none."""
    if checkpoint.model_name and timm.is_model(checkpoint.model_name):
        return checkpoint.model_name, dict(checkpoint.model_kwargs)
    for read_architecture, _ in FAMILIES.values():
        described = read_architecture(checkpoint.state_dict)
        if described is not None:
            name, inferred = described
            return name, dict(checkpoint.model_kwargs, **inferred)
    raise CheckpointError('these weights are not a PosMLP model (they have no stem.conv1 / stages.*.blocks.* '
                          'weights), nor a ViP or an EAMLP, the only models whose arguments can be read off their '
                          'weights.')


def create_model_from_checkpoint(
        checkpoint: Any,
        model_name: Optional[str] = None,
        use_ema: Optional[bool] = None,
        finetune: bool = False,
        **kwargs,
) -> nn.Module:
    """Build a model and load a checkpoint's weights into it.

    Args:
        checkpoint: a path, or a `LoadedCheckpoint` from `read_checkpoint`.
        model_name: a timm model name; when None (or the name the checkpoint records), the model the
            checkpoint describes: the name and arguments it records, else the PosMLP, ViP or EAMLP variant
            its weights show (so the authors' checkpoints need no name).
        use_ema: True for EMA weights, False for live ones, None for EMA when present.
        finetune: allow a different `num_classes` (in kwargs): the head is then re-initialised.
        kwargs: more model arguments (e.g. num_classes, drop_path_rate, gate_impl), over the recorded ones.
    """
    other_weights = sorted(k for k in WEIGHT_SOURCE_ARGS if kwargs.get(k))
    if other_weights:
        raise CheckpointError(
            f'{", ".join(other_weights)} would load other weights (from a file, a URL or the Hugging Face Hub) '
            f'into the model the checkpoint\'s weights go into; leave {"them" if len(other_weights) > 1 else "it"} '
            f'out (validate.py: of --model-kwargs).')
    if not isinstance(checkpoint, LoadedCheckpoint):
        checkpoint = read_checkpoint(checkpoint, use_ema)
    try:
        described_name, described_kwargs = _described_model(checkpoint)
    except CheckpointError as undescribed:
        if model_name is None and checkpoint.model_name:
            raise CheckpointError(
                f'{checkpoint.path} was made with model {checkpoint.model_name!r}, which timm does not know: import '
                f'the module that registers it first, or pass model_name (validate.py: --model) and its arguments.'
            ) from undescribed
        if model_name is None:
            raise CheckpointError(f'{checkpoint.path} records no model name, and {undescribed} Pass model_name '
                                  f'(validate.py: --model) and the arguments of the model they were made for.'
                                  ) from undescribed
        described_name, described_kwargs = None, {}
    model_name = model_name or described_name
    model_kwargs = dict(described_kwargs if model_name == described_name else {}, **kwargs)
    if described_name is None:
        hint = 'Pass model_name (validate.py: --model) and the arguments of the model it was made for.'
    elif model_name != described_name:
        hint = (f'Leave out model_name (validate.py: --model) to build the {described_name} the checkpoint '
                f'describes, or pick the matching one.')
    else:
        changed = sorted(k for k, v in kwargs.items() if k not in NON_ARCHITECTURE_ARGS
                         and (k not in described_kwargs or described_kwargs[k] != v))
        hint = (f'The arguments {", ".join(changed)} (validate.py: --model-kwargs) change the architecture the '
                f'checkpoint describes; leave them out.' if changed else
                'Pass model_name (validate.py: --model) and the arguments of the model it was made for.')
    # The input the checkpoint was trained on, and its class count, become the model's pretrained_cfg, which
    # timm's data config (and anything else reading the cfg) takes as the model's own.
    recorded = _recorded_data_config(checkpoint, model_kwargs, kwargs)
    if 'num_classes' in model_kwargs:
        recorded['num_classes'] = model_kwargs['num_classes']
    model_kwargs['pretrained_cfg_overlay'] = dict(recorded, **model_kwargs.get('pretrained_cfg_overlay') or {})
    features_only = model_kwargs.pop('features_only', False)
    feature_kwargs = {k: model_kwargs.pop(k) for k in FEATURE_ARGS if k in model_kwargs}
    origin = _model_origin(checkpoint.path, model_name != described_name, kwargs)
    model = _build_model(model_name, model_kwargs, origin)
    load_weights(model, checkpoint.state_dict, f'{checkpoint.path} ({checkpoint.weights})', finetune, hint)
    _logger.info(f'Loaded {checkpoint.weights} weights of {checkpoint.path} into {model_name}.')
    if features_only:
        # As timm's pretrained path does: weights go into the model, which is then wrapped (and pruned) for
        # features. timm loads them as for 0 classes, so the model is built, and its weights given, headless.
        body = {k: v for k, v in model.state_dict().items() if not k.startswith(_classifier_prefixes(model))}
        overlay = {k: v for k, v in model_kwargs['pretrained_cfg_overlay'].items() if k not in WEIGHT_LOCATIONS}
        overlay.update(state_dict=body, num_classes=0)
        cfg = model.pretrained_cfg
        model = _build_model(model_name, dict(model_kwargs, num_classes=0, pretrained_cfg_overlay=overlay), origin,
                             pretrained=True, features_only=True, **feature_kwargs)
        model.pretrained_cfg = model.default_cfg = pretrained_cfg_for_features(cfg)
    return model


def _model_origin(path: str, name_given: bool, given_kwargs: Dict[str, Any]) -> str:
    """Where the name and arguments of the model to build came from, and the fix, for the error when it cannot
    be built."""
    given = ['model_name (--model)'] * name_given + [
        f'the arguments {", ".join(sorted(given_kwargs))} (--model-kwargs)'] * bool(given_kwargs)
    if not given:
        return (f'as {path} records them: the checkpoint was altered or made for another version of the model; '
                f'pass the model and its arguments (--model, --model-kwargs) yourself')
    return f'with {" and ".join(given)} given over what {path} records; correct or leave out {" and ".join(given)}'


def _build_model(model_name: str, model_kwargs: Dict[str, Any], origin: str, **more) -> nn.Module:
    """timm.create_model; a model that cannot be built is one line naming it, its arguments and their `origin`
    (see _model_origin)."""
    try:
        return timm.create_model(model_name, **model_kwargs, **more)
    except (TypeError, ValueError, RuntimeError, MemoryError) as e:
        shown = {k: v for k, v in model_kwargs.items() if k != 'pretrained_cfg_overlay'}
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        if isinstance(e, MemoryError) or 'memory' in reason:
            reason = f'it needs more memory than this machine has: {reason}'
        raise CheckpointError(f'model {model_name!r} cannot be built with the arguments {shown} ({reason}), '
                              f'{origin}.') from None


def _recorded_data_config(checkpoint: LoadedCheckpoint, model_kwargs: Dict[str, Any], given: Dict[str, Any]) -> dict:
    """The input options the checkpoint was trained with, as pretrained_cfg entries.

    The size is, as in training, its input_size, else its img_size option, else the model's img_size;
    an img_size given now wins, since the model is then built for it.
    """
    args = {k: v for k, v in checkpoint.args.items() if v not in (None, '')}
    config = {k: args[k] for k in ('crop_pct', 'crop_mode', 'interpolation') if k in args}
    config.update({k: tuple(args[k]) for k in ('mean', 'std') if k in args})
    in_chans = model_kwargs.get('in_chans') or args.get('in_chans') or 3
    if 'img_size' not in given and 'input_size' in args:
        config['input_size'] = tuple(args['input_size'])
    else:
        size = given.get('img_size') or args.get('img_size') or model_kwargs.get('img_size')
        if size:
            config['input_size'] = (in_chans, *to_2tuple(size))
    return config
