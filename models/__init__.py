"""PosMLP and the models of its paper's comparison table, registered with timm on import:
`import models; timm.create_model('posmlp_t')` (also `vip_s7`, `eamlp_14`, `resmlp_b24_224`, ...)."""
from .checkpoint import (
    CheckpointError, LoadedCheckpoint, create_model_from_checkpoint, infer_model_kwargs, load_checkpoint_file,
    load_weights, read_checkpoint, save_checkpoint_file, select_state_dict,
)
from .eamlp import EAMLP
from .posmlp import PosMLP, checkpoint_filter_fn, level_sizes, valid_img_sizes
from .resmlp import resmlp_b24_224
from .vip import VisionPermutator

__all__ = [
    'CheckpointError', 'EAMLP', 'LoadedCheckpoint', 'PosMLP', 'VisionPermutator', 'checkpoint_filter_fn',
    'create_model_from_checkpoint', 'infer_model_kwargs', 'level_sizes', 'load_checkpoint_file', 'load_weights',
    'read_checkpoint', 'resmlp_b24_224', 'save_checkpoint_file', 'select_state_dict', 'valid_img_sizes',
]
