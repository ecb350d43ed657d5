#!/usr/bin/env python3
"""Export a checkpoint as a Hugging Face Hub model folder that timm loads, with a model card of its run.

    python export_hub.py --checkpoint output/train/RUN/model_best.pth.tar --output hub/posmlp_t-run

The folder holds timm's `config.json` and `model.safetensors` (written by timm's save_for_hf), a
model card `README.md` (metrics, recipe, data and command of the run, from the checkpoint and the
run's summary.csv beside it) and the run's options as `args.yaml`. Load it with
`timm.create_model('local-dir:FOLDER', pretrained=True)` after `import models`; nothing is uploaded
(push the folder with `huggingface-cli upload` when you choose to). EMA weights are exported when
the checkpoint has them (--no-use-ema for the live ones).
"""
import argparse
import contextlib
import json
import logging
import os
import re
import sys
from typing import List, Optional

import utils.offline  # noqa: F401  (first: the hub client reads its switches when timm imports it)

import safetensors
import yaml
from timm.models import get_pretrained_cfg, save_for_hf

import models
from models import LoadedCheckpoint
from utils.args import DefaultsHelpFormatter
from utils.data import validation_folder_label
from utils.distributed import run_script
from utils.errors import CheckpointError, OutputError
from utils.outputs import ARGS_FILE, SUMMARY_FILE, atomic_folder, output_error, read_summary_rows, setup_logging
from utils.weights_choice import add_weights_choice, is_ema

_logger = logging.getLogger('export_hub')

# The options of a run that make its recipe, in the order the card lists them (those the run recorded).
RECIPE_OPTIONS = (
    'epochs', 'cooldown_epochs', 'batch_size', 'grad_accum_steps', 'opt', 'opt_eps', 'lr', 'weight_decay', 'sched',
    'warmup_epochs', 'warmup_lr', 'min_lr', 'clip_grad', 'drop', 'drop_path', 'smoothing', 'mixup', 'cutmix', 'aa',
    'reprob', 'color_jitter', 'scale', 'ratio', 'model_ema', 'model_ema_decay', 'amp', 'amp_dtype', 'seed',
)
# pretrained_cfg entries of the registered model that describe its own published weights, not these.
SOURCE_ENTRIES = ('tag', 'hf_hub_id', 'url', 'origin_url')


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='export_hub.py', description=__doc__.split('\n\n')[0],
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument('--checkpoint', required=True, metavar='PATH',
                        help="a checkpoint of this project's train.py (or a cleaned or averaged one, or the authors')")
    parser.add_argument('--output', required=True, metavar='DIR', help='the folder to create (it must not exist)')
    add_weights_choice(parser, 'export')
    return parser


def label_names(class_to_idx: Optional[dict]):
    """timm's `label_names`: class names in label order (a dict label -> name when labels have gaps)."""
    if not class_to_idx:
        return None
    by_label = {label: name for name, label in class_to_idx.items()}
    if sorted(by_label) == list(range(len(by_label))):
        return [by_label[label] for label in range(len(by_label))]
    return {str(label): name for label, name in sorted(by_label.items())}


def correct_config(folder: str, model_name: str):
    """Drop what config.json inherits from the registered model's own weights: their tag and links, and the
    final map size at its default input, which these weights need not share."""
    path = os.path.join(folder, 'config.json')
    with open(path) as f:
        config = json.load(f)
    cfg = config['pretrained_cfg']
    for key in SOURCE_ENTRIES:
        cfg.pop(key, None)
    if tuple(cfg.get('input_size', ())) != tuple(get_pretrained_cfg(model_name).input_size or ()):
        cfg.pop('pool_size', None)
    with open(path, 'w') as f:
        json.dump(config, f, indent=2)


def metrics_section(loaded: LoadedCheckpoint, rows: List[dict]) -> List[str]:
    prefix = 'ema' if is_ema(loaded.weights) else 'eval'
    which = 'EMA' if prefix == 'ema' else 'live (non-EMA)'
    lines = ['## Metrics', '', f'These are the {which} weights of epoch {loaded.epoch}.']
    row = next((r for r in rows if loaded.epoch is not None and int(float(r['epoch'])) == loaded.epoch), None)
    if row and row.get(f'{prefix}_top1'):
        lines += ['Measured on the validation split in training (from the run\'s summary.csv):', '',
                  '| epoch | top-1 | top-5 | loss |', '|---|---|---|---|',
                  f'| {loaded.epoch} | {float(row[f"{prefix}_top1"]):.3f} | {float(row[f"{prefix}_top5"]):.3f} '
                  f'| {float(row[f"{prefix}_loss"]):.4f} |']
        if len(rows) > 1:
            lines += ['', f'The run trained {len(rows)} epochs; summary.csv has every epoch\'s numbers.']
    elif loaded.metric is not None:
        measure = loaded.args.get('eval_metric', 'top1')
        lines += [f'The checkpoint records {measure} {loaded.metric:.3f} for the model it was ranked by '
                  f'(no summary.csv was found beside it).']
    else:
        lines += ['The checkpoint records no metrics.']
    return lines


def recipe_section(args: dict) -> List[str]:
    unused = {'model_ema_decay': not args.get('model_ema'), 'amp_dtype': not args.get('amp')}
    recorded = [(k, args[k]) for k in RECIPE_OPTIONS if args.get(k) is not None and not unused.get(k)]
    if not recorded:
        return ['## Recipe', '', 'The checkpoint records no training options.']
    lines = ['## Recipe', '', '| option | value |', '|---|---|']
    lines += [f'| `{k}` | `{v}` |' for k, v in recorded]
    return lines + ['', f'Every option of the run is in `{ARGS_FILE}` in this folder.']


def data_section(loaded: LoadedCheckpoint, cfg: dict, num_classes: int) -> List[str]:
    args = loaded.args
    source = args.get('dataset') or 'image folder'
    lines = ['## Data', '']
    root = args.get('data_dir') or args.get('data')
    if root:
        val_folder = validation_folder_label(root, args.get('val_split') or 'validation')
        lines.append(f'Trained on the `{args.get("train_split", "train")}/` split of `{root}` ({source}), validated '
                     f'on its `{val_folder}` split.')
    names = label_names(loaded.class_to_idx)
    if names:
        shown = list(names.values() if isinstance(names, dict) else names)
        listing = ', '.join(shown[:20]) + (f', ... ({len(shown)} in all)' if len(shown) > 20 else '')
        lines.append(f'{num_classes} classes: {listing}.')
    else:
        lines.append(f'{num_classes} classes.')
    lines.append(f'Input: {cfg["input_size"][1]}x{cfg["input_size"][2]}, crop {cfg.get("crop_pct")} '
                 f'({cfg.get("crop_mode", "center")}), {cfg.get("interpolation")} resize, mean {list(cfg["mean"])}, '
                 f'std {list(cfg["std"])}.')
    return lines


def model_card(loaded: LoadedCheckpoint, model, output: str, rows: List[dict]) -> str:
    cfg = model.pretrained_cfg
    name = cfg['architecture']
    license_name = cfg.get('license')
    tags = ['image-classification', 'timm'] + (['posmlp'] if name.startswith('posmlp') else [])
    header = ['---', 'library_name: timm', f'tags: [{", ".join(tags)}]']
    header += [f'license: {license_name}'] if license_name else []
    lines = header + ['---', '', f'# {name}: {os.path.basename(os.path.normpath(output))}', '',
                      f'`{name}` ({sum(p.numel() for p in model.parameters()):,} parameters) trained with the PosMLP '
                      f'repository\'s `train.py`, exported from `{os.path.basename(loaded.path)}`.', '',
                      '## Use', '', '```python', 'import timm', 'import models  # the PosMLP repository: registers '
                      'posmlp_* with timm', '', f"model = timm.create_model('local-dir:{output}', pretrained=True)",
                      'data_config = timm.data.resolve_data_config({}, model=model)',
                      'transform = timm.data.create_transform(**data_config)', '```', '']
    lines += metrics_section(loaded, rows) + ['']
    lines += data_section(loaded, cfg, model.num_classes) + ['']
    lines += recipe_section(loaded.args) + ['']
    lines += ['## Command', '']
    if loaded.args:
        lines += ['Run from the PosMLP repository; the options file names the data folder, so point it at your '
                  'copy of the data:', '', '```bash', f'python train.py -c {ARGS_FILE}', '```']
    else:
        lines += ['The checkpoint records no training options.']
    return '\n'.join(lines) + '\n'


def plain(value):
    """`value` as YAML-safe plain data (tuples as lists, anything unknown as its text)."""
    return json.loads(json.dumps(value, default=str))


def write_folder(folder: str, loaded: LoadedCheckpoint, model, output: str):
    names = label_names(loaded.class_to_idx)
    save_for_hf(model, folder, model_config=dict(label_names=names) if names else None, safe_serialization=True)
    correct_config(folder, model.pretrained_cfg['architecture'])
    with open(os.path.join(folder, 'README.md'), 'w') as f:
        rows = read_summary_rows(os.path.join(os.path.dirname(os.path.abspath(loaded.path)), SUMMARY_FILE))
        f.write(model_card(loaded, model, output, rows))
    if loaded.args:
        with open(os.path.join(folder, ARGS_FILE), 'w') as f:
            yaml.safe_dump(plain(loaded.args), f, sort_keys=False)


@contextlib.contextmanager
def written_as(output: str):
    """An export that cannot be written is an OutputError naming `output` (not the hidden folder it is made in)
    and the fix; safetensors reports its file-system errors as SafetensorError, with the OS's code in its text."""
    try:
        yield
    except OSError as e:
        raise output_error(OSError(e.errno, e.strerror), output) from None
    except safetensors.SafetensorError as e:
        code = re.search(r'code: (\d+)', str(e))
        cause = OSError(int(code.group(1)), os.strerror(int(code.group(1)))) if code else OSError(None, str(e))
        raise output_error(cause, output) from None


def export(args) -> str:
    output = os.path.normpath(args.output)
    if os.path.lexists(output):
        raise CheckpointError(f'{output} already exists; choose a new --output folder (nothing is overwritten).')
    loaded = models.read_checkpoint(args.checkpoint, use_ema=args.use_ema)
    model = models.create_model_from_checkpoint(loaded).eval()
    with written_as(output):
        with atomic_folder(output) as partial:  # a crash leaves no half-written export
            write_folder(partial, loaded, model, output)
    _logger.info(f'Exported the {loaded.weights} of {args.checkpoint} to {output}/ (config.json, model.safetensors, '
                 f'README.md{", " + ARGS_FILE if loaded.args else ""}).')
    _logger.info(f"Load it with timm.create_model('local-dir:{output}', pretrained=True) after `import models`.")
    return output


def main(argv=None) -> int:
    args = export_parser().parse_args(argv)
    setup_logging(None, True)
    return run_script(export, args, (CheckpointError, OutputError), _logger)


if __name__ == '__main__':
    sys.exit(main())
