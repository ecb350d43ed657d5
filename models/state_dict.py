"""The weights inside a training checkpoint, shared by the comparison models' checkpoint filters."""
from typing import Dict

import torch
from timm.models import clean_state_dict

# A training checkpoint's weight entries, most preferred first: the EMA weights, which the authors evaluated.
WEIGHT_KEYS = ('state_dict_ema', 'model_ema', 'state_dict', 'model')


def training_weights(checkpoint: dict) -> Dict[str, torch.Tensor]:
    """The state dict of a whole training checkpoint (its EMA weights when present), or a state dict as
    given; either way without the `module.` / `_orig_mod.` prefixes that DDP and torch.compile add."""
    for key in WEIGHT_KEYS:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return clean_state_dict(checkpoint)
