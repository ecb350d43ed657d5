"""Mixed precision: native torch autocast (float16 or bfloat16), or NVIDIA apex when it is installed.

`--amp` (alias `--native-amp`) autocasts to `--amp-dtype`, on CUDA and on the CPU alike (torch
autocasts both float16 and bfloat16 on the CPU); float16 also gets a gradient scaler.
`--apex-amp` uses apex.amp on CUDA when apex imports, and otherwise falls back to native AMP,
saying so in exactly one warning.
"""
import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
from timm.utils import ApexScaler, NativeScaler

try:
    from apex import amp as apex_amp
except ImportError:
    apex_amp = None

_logger = logging.getLogger(__name__)

AMP_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}
# The autocast type where none is named: CPUs compute bfloat16 natively far more often than float16.
DEFAULT_AMP_DTYPE = {'cpu': 'bfloat16', 'cuda': 'float16'}


@dataclass
class Precision:
    autocast: Callable[[], ContextManager]
    loss_scaler: Optional[object]  # timm NativeScaler / ApexScaler: backward, clipping and step in one call
    description: str


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
    amp_dtype = amp_dtype or DEFAULT_AMP_DTYPE.get(device.type, 'float16')
    if apex:
        if apex_amp is not None and device.type == 'cuda' and optimizer is not None:
            model, optimizer = apex_amp.initialize(model, optimizer, opt_level='O1')
            return model, optimizer, Precision(contextlib.nullcontext, ApexScaler(), 'NVIDIA apex AMP (O1)')
        reason = 'NVIDIA apex is not installed' if apex_amp is None else 'NVIDIA apex needs CUDA'
        return model, optimizer, _native(device, amp_dtype, note=f'--apex-amp: {reason}; ', warn=warn)
    if amp:
        return model, optimizer, _native(device, amp_dtype, warn=warn)
    return model, optimizer, Precision(contextlib.nullcontext, None, 'float32')
