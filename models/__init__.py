"""PosMLP models, registered with timm on import: `import models; timm.create_model('posmlp_t')`."""
from .checkpoint import (
    CheckpointError, LoadedCheckpoint, create_model_from_checkpoint, infer_model_kwargs, load_checkpoint_file,
    load_weights, read_checkpoint, save_checkpoint_file, select_state_dict,
)
from .posmlp import PosMLP, checkpoint_filter_fn, level_sizes, valid_img_sizes

__all__ = [
    'CheckpointError', 'LoadedCheckpoint', 'PosMLP', 'checkpoint_filter_fn', 'create_model_from_checkpoint',
    'infer_model_kwargs', 'level_sizes', 'load_checkpoint_file', 'load_weights', 'read_checkpoint',
    'save_checkpoint_file', 'select_state_dict', 'valid_img_sizes',
]
