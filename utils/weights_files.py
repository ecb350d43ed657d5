"""Weights files: one set of a checkpoint's weights, without its optimizer state, for release.

clean_checkpoint.py and avg_checkpoints.py write them. A weights file holds `state_dict` and the
plain data that rebuilds and labels its model: the model name and arguments, the class map and the
input options of the run. As `.pth` it is a torch.save of that dict; as `.safetensors` the tensors
are the weights and the rest is JSON in the file's metadata (see `models.save_checkpoint_file`).
Either loads through `models.create_model_from_checkpoint` and through timm's pretrained route
(`timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=PATH, num_classes=N))`).
"""
import contextlib
import hashlib
import os
from typing import Optional, Tuple

import models
from models import LoadedCheckpoint
from models.checkpoint import SAFETENSORS_SUFFIX
from .data import recorded_input_options
from .errors import CheckpointError
from .outputs import output_error

# Endings that name checkpoint and weights files, longest first: 'model_best.pth.tar' has the stem 'model_best'.
WEIGHTS_SUFFIXES = ('.pth.tar', SAFETENSORS_SUFFIX, '.pth', '.tar', '.bin', '.pt')
PTH_SUFFIX = '.pth'
# Model arguments that only mattered in training, left out of the loading hint.
RUN_ONLY_KWARGS = ('drop_rate', 'drop_path_rate', 'drop_block_rate')


def weights_content(checkpoint: LoadedCheckpoint, state_dict: Optional[dict] = None, **extra) -> dict:
    """What a weights file holds: the weights (`state_dict`, or the checkpoint's chosen ones) and what
    rebuilds, labels and feeds their model, as far as the checkpoint records it."""
    content = dict(state_dict=checkpoint.state_dict if state_dict is None else state_dict)
    if checkpoint.model_name:
        content.update(model_name=checkpoint.model_name, model_kwargs=dict(checkpoint.model_kwargs))
    if checkpoint.class_to_idx:
        content['class_to_idx'] = dict(checkpoint.class_to_idx)
    # Of the run's options, those that set the evaluation input, so the file is evaluated as it was trained;
    # paths and the recipe stay behind.
    inputs = recorded_input_options(checkpoint.args)
    if inputs:
        content['args'] = inputs
    content.update({k: v for k, v in extra.items() if v is not None})
    return content


def split_suffix(name: str) -> Tuple[str, str]:
    """(stem, suffix) of a file name, the suffix being a known weights ending ('' when none)."""
    suffix = next((s for s in WEIGHTS_SUFFIXES if name.endswith(s) and len(name) > len(s)), '')
    return name[:len(name) - len(suffix)], suffix


def output_suffix(option: str, path: str, safetensors: bool) -> str:
    """The ending of an output file: the one `path` has, else .safetensors or .pth as `safetensors` says.

    The format follows the name (loaders tell safetensors by it), so --safetensors with another
    ending is refused rather than written under a name that would be read wrongly.
    """
    suffix = split_suffix(os.path.basename(path))[1]
    if safetensors and suffix not in ('', SAFETENSORS_SUFFIX):
        raise CheckpointError(f'{option} {path}: --safetensors writes a safetensors file, which loaders recognise '
                              f'by the {SAFETENSORS_SUFFIX} ending; name it so, or leave the ending out.')
    return suffix or (SAFETENSORS_SUFFIX if safetensors else PTH_SUFFIX)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def refuse_existing(path: str):
    if os.path.exists(path):
        raise CheckpointError(f'{path} already exists; remove it or choose another --output (nothing is overwritten).')


def write_weights_file(content: dict, path: str, hash_in_name: bool) -> Tuple[str, str]:
    """Write `content` to `path` (its ending picks the format) and return (final path, SHA-256).

    With `hash_in_name` the file is named STEM-<first 8 hex digits of its SHA-256>SUFFIX, as timm's
    release files are. It is written whole under a hidden name first, so a crash or a refusal leaves nothing;
    a file that cannot be written is an OutputError naming `path` and the fix (for --output).
    """
    folder, name = os.path.split(os.path.abspath(path))
    stem, suffix = split_suffix(name)
    if not hash_in_name:
        refuse_existing(path)
    partial = os.path.join(folder, f'.partial-{os.getpid()}-{name}')
    try:
        models.save_checkpoint_file(content, partial)
        sha256 = sha256_of(partial)
        final = os.path.join(os.path.dirname(path), f'{stem}-{sha256[:8]}{suffix}') if hash_in_name else path
        if hash_in_name and os.path.exists(final) and sha256_of(final) == sha256:
            os.remove(partial)  # the same bytes are there already
        else:
            refuse_existing(final)
            os.replace(partial, final)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(partial)
        if isinstance(e, OSError):
            # The user's path, not the hidden name: that is gone, and --output chose the folder.
            named = path if e.filename in (None, partial) else e.filename
            raise output_error(OSError(e.errno, e.strerror, named), path) from None
        raise
    return final, sha256


def loading_hint(path: str, content: dict) -> str:
    """How to load a weights file, for the line a script prints after writing it."""
    hint = f'models.create_model_from_checkpoint({path!r})'
    if 'model_name' not in content:
        return hint
    kwargs = {k: v for k, v in content['model_kwargs'].items() if k not in RUN_ONLY_KWARGS}
    num_classes = kwargs.pop('num_classes', None)
    overlay = f'file={path!r}' + (f', num_classes={num_classes}' if num_classes is not None else '')
    arguments = ''.join(f', {k}={v!r}' for k, v in kwargs.items())
    return (f"{hint}, or timm.create_model({content['model_name']!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict({overlay}){arguments}) after `import models`")
