"""Mixed precision: native torch autocast (float16 or bfloat16), or NVIDIA apex's amp where it works; and
the CUDA math settings of timm's train.py and validate.py.

`--amp` (alias `--native-amp`) autocasts to `--amp-dtype`, on CUDA and on the CPU alike (torch
autocasts both float16 and bfloat16 on the CPU); float16 also gets a gradient scaler.
`--apex-amp` uses apex.amp (opt level O1) on CUDA. It falls back to native AMP, saying why in exactly one
warning, when apex or its `apex.amp` is missing (current apex releases have none), on other devices, and
for models with GQPE gates: O1 patches torch's functions to multiply matrices in float16, which
`torch.autocast(enabled=False)` does not undo, so GQPE's positional maps would be made in float16
instead of float32.
"""
import contextlib
import functools
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, ContextManager, Optional, Tuple

import torch
from timm.utils import ApexScaler, NativeScaler

from models.posmlp import GQPE

_logger = logging.getLogger(__name__)

AMP_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}
# The autocast type where none is named: CPUs compute bfloat16 natively far more often than float16.
DEFAULT_AMP_DTYPE = {'cpu': 'bfloat16', 'cuda': 'float16'}
APEX = 'NVIDIA apex'
NATIVE_FLOAT16 = 'native float16 AMP'


@dataclass
class Precision:
    autocast: Callable[[], ContextManager]
    loss_scaler: Optional[object]  # timm NativeScaler / ApexScaler: backward, clipping and step in one call
    description: str


def use_tf32_and_cudnn_benchmark(device: torch.device):
    """On CUDA, as timm's train.py and validate.py: float32 matrix multiplies in TF32 (float32's range, a
    10-bit mantissa; cuDNN's convolutions already default to it) and cuDNN's autotuner, which picks the
    fastest convolution algorithms for the fixed input size."""
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def apex_amp() -> Tuple[Optional[ModuleType], str]:
    """NVIDIA apex's `apex.amp`, or None and why it cannot be used."""
    try:
        from apex import amp
    except Exception as e:  # a broken apex build fails in many ways, not only with ImportError
        if isinstance(e, ModuleNotFoundError) and e.name == 'apex':
            return None, f'{APEX} is not installed'
        return None, f'{APEX} has no usable apex.amp (current apex releases have none): {type(e).__name__}: {e}'
    return amp, ''


def has_gqpe(model) -> bool:
    return any(isinstance(module, GQPE) for module in model.modules())


def resolve_amp_dtype(device: torch.device, amp_dtype: Optional[str] = None) -> str:
    """The autocast type: `amp_dtype`, else the device's default (DEFAULT_AMP_DTYPE)."""
    return amp_dtype or DEFAULT_AMP_DTYPE.get(device.type, 'float16')


def _native(device: torch.device, amp_dtype: str, note: str = '', warn: Callable = _logger.warning) -> Precision:
    dtype = AMP_DTYPES[amp_dtype]
    if note:
        warn(f'{note}using native torch AMP ({amp_dtype}) instead.')
    autocast = functools.partial(torch.autocast, device_type=device.type, dtype=dtype)
    scaler = NativeScaler(device=device.type) if dtype == torch.float16 else None
    return Precision(autocast, scaler, f'native AMP ({amp_dtype})')


def resolve_precision(device: torch.device, amp: bool = False, apex: bool = False,
                      amp_dtype: Optional[str] = None, model=None, optimizer=None, announce: bool = True):
    """(model, optimizer, Precision): apex rewrites the model and optimizer, native AMP leaves them.

    `amp_dtype` None is the device's default type (`DEFAULT_AMP_DTYPE`).

    `announce` False keeps a fallback warning to the debug log (every process but the first of a launch).
    """
    warn = _logger.warning if announce else _logger.debug
    amp_dtype = resolve_amp_dtype(device, amp_dtype)
    if apex:
        apex_module, reason = apex_amp()
        if apex_module is not None and device.type != 'cuda':
            reason = f'{APEX} needs CUDA'
        elif apex_module is not None and has_gqpe(model):
            reason = (f'{APEX} O1 would make GQPE\'s positional maps in float16 (it patches torch\'s functions, '
                      f'which the model\'s autocast(enabled=False) does not undo), and they must stay float32')
        if reason:
            return model, optimizer, _native(device, amp_dtype, note=f'--apex-amp: {reason}; ', warn=warn)
        model, optimizer = apex_module.initialize(model, optimizer, opt_level='O1')
        return model, optimizer, Precision(contextlib.nullcontext, ApexScaler(), f'{APEX} AMP (O1)')
    if amp:
        return model, optimizer, _native(device, amp_dtype, warn=warn)
    return model, optimizer, Precision(contextlib.nullcontext, None, 'float32')


def scaler_kind(loss_scaler) -> str:
    return APEX if isinstance(loss_scaler, ApexScaler) else NATIVE_FLOAT16


def scaler_state_kind(state: dict) -> str:
    """Which kind of scaler wrote `state`: torch's GradScaler (timm's NativeScaler) keeps a 'scale', apex's
    amp a 'loss_scalerN' entry per loss. Each fails on the other's state (a KeyError, a RuntimeError)."""
    if 'scale' in state:
        return NATIVE_FLOAT16
    if state and all(str(key).startswith('loss_scaler') for key in state):
        return APEX
    return 'unknown'
