"""Checkpoints as train.py writes them, made without training, for the tests of the checkpoint tools."""
import timm
import torch
from timm.utils import ModelEmaV3

from conftest import TINY_KWARGS

import models
from utils.run_checkpoints import training_state

CLASS_TO_IDX = {'cat': 0, 'dog': 1, 'fox': 2}
# Input options a run records: evaluation must use them (not the model's 224 px defaults).
INPUT_ARGS = dict(img_size=32, crop_pct=1.0, interpolation='bilinear', mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def write_checkpoint(path, epoch=0, metric=50.0, seed=0, ema=True, eval_metric='top1', model_name='posmlp_t',
                     model_kwargs=None, class_to_idx=CLASS_TO_IDX, num_classes=None) -> dict:
    """A train.py checkpoint of a model with seeded weights; its EMA weights differ from the live ones.
    `num_classes` defaults to the class map's. Returns what was saved."""
    torch.manual_seed(seed)
    num_classes = num_classes or len(class_to_idx)
    model_kwargs = dict(TINY_KWARGS if model_kwargs is None else model_kwargs, num_classes=num_classes)
    model = timm.create_model(model_name, **model_kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model_ema = None
    if ema:
        model_ema = ModelEmaV3(model)
        with torch.no_grad():
            for p in model_ema.module.parameters():
                p.add_(torch.randn_like(p), alpha=0.01)
    args = dict(INPUT_ARGS, eval_metric=eval_metric, data_dir='data', model=model_name, epochs=10, lr=1e-3)
    state = training_state(epoch, model_name, model_kwargs, model, optimizer, None, None, model_ema, args, metric,
                           class_to_idx)
    models.save_checkpoint_file(state, str(path))
    return state


def logits(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)
