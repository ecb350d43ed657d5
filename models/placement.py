"""timm's `device` and `dtype` model arguments (`timm.create_model(name, device='meta', dtype=torch.bfloat16)`)
for this project's models."""
import contextlib
from typing import Callable, Optional, Union

import torch
from torch import nn


def build_placed(build: Callable[..., nn.Module], *args, device: Optional[Union[str, torch.device]] = None,
                 dtype: Optional[torch.dtype] = None, **kwargs) -> nn.Module:
    """`build(*args, **kwargs)` with its tensors made on `device` and cast to `dtype` (floating ones). timm's
    own models pass both to every layer; building under the device and casting once gives the same model."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build(*args, **kwargs)
    return model.to(dtype) if dtype is not None else model
