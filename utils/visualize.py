"""Figures: the learned token-mixing maps of a checkpoint, and training curves of runs.

    python -m utils.visualize maps --checkpoint output/quickstart/model_best.pth.tar --blocks 0.0 1.0 \\
        --token center --out figures/maps.png
    python -m utils.visualize curves output/a/summary.csv output/b/summary.csv --labels a b \\
        --out figures/curves.png

A PoSGU gate mixes the tokens of a w x w window with one N x N map per channel group (N = w * w;
row m is the output token, column n the input token, token p = r * w + c). For one output token,
row m of each group's map, laid out over the window, shows where that token gathers from. GQPE maps
are softmax-normalised Gaussians (non-negative, drawn on a sequential scale); LRPE maps and gMLP's
SGU matrix are raw weights that may be negative (drawn on a diverging scale centred at 0). SGU has a
single map shared by all channels.

matplotlib is an optional dependency, imported only when a figure is drawn; it renders with the
file-only Agg backend, so no display is needed.
"""
import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import utils.offline  # noqa: F401  (first: the hub client reads its switches when timm imports it)

import torch

import models
from models.posmlp import GQPE, PoSGU, SGU
from utils.errors import CheckpointError, VisualizeError
from utils.outputs import read_summary_rows

__all__ = [
    'TokenMaps', 'require_pyplot', 'parse_block', 'parse_token', 'block_token_maps',
    'draw_token_maps', 'read_summary', 'draw_curves', 'main',
]

CURVE_METRICS = ('loss', 'top1', 'top5')
CURVE_SERIES = ('train', 'eval', 'ema')
# Line style per series, so one colour can stand for one run (or one label) across series.
SERIES_STYLES = {'train': '-', 'eval': '--', 'ema': ':'}
METRIC_TITLES = {'loss': 'loss', 'top1': 'top-1 (%)', 'top5': 'top-5 (%)'}
MAX_GROUP_COLUMNS = 8


def require_pyplot():
    """matplotlib.pyplot on the Agg backend, or an error that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise VisualizeError('drawing figures needs matplotlib, which is not installed; '
                             'install it with `pip install matplotlib`.') from None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


@dataclass
class TokenMaps:
    """Row `token` of one block's mixing maps, each laid out over the window: (groups, w, w)."""
    stage: int
    block: int
    kind: str  # 'GQPE', 'LRPE' or 'SGU'
    win_size: int
    token: Tuple[int, int]  # (row, col) of the output token inside the window
    maps: torch.Tensor

    @property
    def signed(self) -> bool:
        """Raw weights, possibly negative, as opposed to GQPE's softmax probabilities."""
        return self.kind != 'GQPE'


def parse_block(spec: str, model) -> Tuple[int, int]:
    """'S.B' -> (stage S, block B), checked against the model's stages and depths."""
    depths = [len(stage.blocks) for stage in model.stages]
    available = ', '.join(f'{s}.0-{s}.{d - 1}' if d > 1 else f'{s}.0' for s, d in enumerate(depths) if d)
    parts = spec.split('.')
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise VisualizeError(f'block {spec!r}: give a block as STAGE.BLOCK, e.g. 0.0 or 2.1; '
                             f'this model has blocks {available}.')
    stage, block = int(parts[0]), int(parts[1])
    if stage >= len(depths) or block >= depths[stage]:
        raise VisualizeError(f'block {spec}: no such block; this model has {len(depths)} stages with '
                             f'depths {depths}, i.e. blocks {available}.')
    return stage, block


def parse_token(spec: str, win_size: int) -> Tuple[int, int]:
    """The output token inside a win_size x win_size window: 'center', 'ROW,COL' or an index ROW * w + COL."""
    if spec == 'center':
        return win_size // 2, win_size // 2
    try:
        if ',' in spec:
            row, col = (int(v) for v in spec.split(','))
        else:
            row, col = divmod(int(spec), win_size)
    except ValueError:
        raise VisualizeError(f"token {spec!r}: give 'center', ROW,COL (e.g. 1,2) or a token index "
                             f"ROW * w + COL.") from None
    if not (0 <= row < win_size and 0 <= col < win_size):
        raise VisualizeError(f"token {spec!r} is outside a {win_size}x{win_size} window; rows and columns run "
                             f"0..{win_size - 1} (index 0..{win_size * win_size - 1}), or use 'center'.")
    return row, col


@torch.no_grad()
def block_token_maps(model, stage: int, block: int, token_spec: str = 'center') -> TokenMaps:
    """The mixing maps of `model.stages[stage].blocks[block]` for one output token."""
    module = model.stages[stage].blocks[block]
    gate = module.gate
    win_size = model.stages[stage].win_size
    row, col = parse_token(token_spec, win_size)
    token = row * win_size + col
    if isinstance(gate, PoSGU):
        kind = 'GQPE' if isinstance(gate.pos, GQPE) else 'LRPE'
        maps = gate.pos()[:, token]
    elif isinstance(gate, SGU):
        kind = 'SGU'
        maps = gate.proj.weight[token][None]
    else:
        raise VisualizeError(f'block {stage}.{block} has a {type(gate).__name__} gate; only PoSGU (GQPE, LRPE) '
                             f'and SGU gates have token-mixing maps to draw.')
    maps = maps.detach().float().cpu().view(-1, win_size, win_size)
    return TokenMaps(stage, block, kind, win_size, (row, col), maps)


def _mark_token(ax, row: int, col: int):
    """Outline the output token's cell, white under black, so it shows on any colour."""
    from matplotlib.patches import Rectangle
    for colour, width in (('white', 3.0), ('black', 1.2)):
        ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor=colour, linewidth=width))


def _draw_block(subfig, token_maps: TokenMaps):
    maps = token_maps.maps
    groups = maps.shape[0]
    cols = min(groups, MAX_GROUP_COLUMNS)
    rows = math.ceil(groups / cols)
    if token_maps.signed:
        # Centred at 0 so the sign of a weight reads off the colour.
        limit = float(maps.abs().max()) or 1.0
        cmap, vmin, vmax = 'RdBu_r', -limit, limit
    else:
        cmap, vmin, vmax = 'viridis', 0.0, float(maps.max()) or 1.0
    axes = subfig.subplots(rows, cols, squeeze=False)
    image = None
    for g, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if g >= groups:
            ax.set_axis_off()
            continue
        image = ax.imshow(maps[g].numpy(), cmap=cmap, vmin=vmin, vmax=vmax, interpolation='nearest')
        _mark_token(ax, *token_maps.token)
        ax.set_title('all channels' if token_maps.kind == 'SGU' else f'group {g}', fontsize=8)
    w = token_maps.win_size
    subfig.suptitle(f'block {token_maps.stage}.{token_maps.block}: {token_maps.kind}, {w}x{w} window\n'
                    f'output token (row {token_maps.token[0]}, col {token_maps.token[1]}) outlined', fontsize=9)
    # Short labels: a long one is clipped by a one-row block's height.
    subfig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9,
                    label='softmax weight' if token_maps.kind == 'GQPE' else 'weight')


def draw_token_maps(checkpoint: str, blocks: Sequence[str], out: str, token: str = 'center',
                    use_ema: Optional[bool] = None, title: Optional[str] = None) -> str:
    """Draw every group's map of each block (e.g. ['0.0', '2.1']) for one output token; returns `out`."""
    if not blocks:
        raise VisualizeError('no blocks given; name at least one as STAGE.BLOCK, e.g. --blocks 0.0.')
    plt = require_pyplot()
    model = models.create_model_from_checkpoint(checkpoint, use_ema=use_ema).eval()
    all_maps = [block_token_maps(model, *parse_block(spec, model), token) for spec in blocks]
    grid_rows = [math.ceil(m.maps.shape[0] / MAX_GROUP_COLUMNS) for m in all_maps]
    # Room for each block's two-line title and every subplot row; never narrower than those titles.
    heights = [0.7 + 1.3 * r for r in grid_rows]
    width = max(4.0, 1.3 * min(max(m.maps.shape[0] for m in all_maps), MAX_GROUP_COLUMNS) + 1.5)
    fig = plt.figure(figsize=(width, sum(heights) + (0.4 if title else 0)), layout='constrained')
    subfigs = fig.subfigures(len(all_maps), 1, height_ratios=heights, squeeze=False).ravel()
    for subfig, token_maps in zip(subfigs, all_maps):
        _draw_block(subfig, token_maps)
    fig.suptitle(title or os.path.basename(checkpoint), fontsize=10, wrap=True)
    return _save(fig, plt, out)


def read_summary(path: str) -> dict:
    """A summary.csv written by train.py as {column: [values per epoch]} (floats; epoch as int)."""
    if not os.path.isfile(path):
        raise VisualizeError(f'{path} does not exist; give the summary.csv of a run (output/<run>/summary.csv).')
    rows = read_summary_rows(path)
    if not rows:
        raise VisualizeError(f'{path} has no epochs yet; draw curves after the run has finished an epoch.')
    missing = [c for c in ('epoch', 'train_loss', 'eval_loss', 'eval_top1') if c not in rows[0]]
    if missing:
        raise VisualizeError(f'{path} lacks the column(s) {", ".join(missing)}; expected a summary.csv written '
                             f'by train.py (epoch, lr, train_loss, eval_loss, eval_top1, ...).')
    columns = {}
    for name in rows[0]:
        try:
            columns[name] = [float(row[name]) for row in rows]
        except (TypeError, ValueError):
            raise VisualizeError(f'{path}: column {name} holds a value that is not a number; '
                                 f'is the file complete?') from None
    columns['epoch'] = [int(e) for e in columns['epoch']]
    return columns


def draw_curves(summaries: Sequence[str], out: str, labels: Optional[Sequence[str]] = None,
                metrics: Sequence[str] = ('loss', 'top1'), series: Sequence[str] = CURVE_SERIES,
                title: Optional[str] = None) -> str:
    """One panel per metric, one colour per label, one line style per series (train, eval, EMA).

    Runs that share a label (e.g. seeds of one setting) share a colour and one legend entry. Series a
    run did not record (EMA off; train has only a loss) are left out. Returns `out`.
    """
    if not summaries:
        raise VisualizeError('no summary.csv given; pass one or more run summaries.')
    if labels is not None and len(labels) != len(summaries):
        raise VisualizeError(f'{len(labels)} labels for {len(summaries)} summaries; give one label per '
                             f'summary.csv, or none to use the run folder names.')
    for name, given, allowed in (('metric', metrics, CURVE_METRICS), ('series', series, CURVE_SERIES)):
        unknown = [v for v in given if v not in allowed]
        if unknown or not given:
            raise VisualizeError(f'{name} {unknown or "(none)"}: choose from {", ".join(allowed)}.')
    labels = list(labels) if labels is not None else [os.path.basename(os.path.dirname(os.path.abspath(p)))
                                                     for p in summaries]
    plt = require_pyplot()
    runs = [read_summary(p) for p in summaries]
    colours = {label: plt.get_cmap('tab10')(i % 10) for i, label in enumerate(dict.fromkeys(labels))}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.0 * len(metrics), 3.8), squeeze=False, layout='constrained')
    for ax, metric in zip(axes[0], metrics):
        drawn = set()
        for run, label in zip(runs, labels):
            for kind in series:
                column = f'{kind}_{metric}'
                if column not in run:
                    continue
                name = f'{label} ({kind})' if len(series) > 1 else label
                ax.plot(run['epoch'], run[column], SERIES_STYLES[kind], color=colours[label],
                        label=None if name in drawn else name, marker='.' if len(run['epoch']) < 30 else None)
                drawn.add(name)
        if not drawn:
            ax.text(0.5, 0.5, f'no {metric} recorded for these series', ha='center', va='center',
                    transform=ax.transAxes)
        else:
            ax.legend(fontsize=8)
        ax.set_xlabel('epoch')
        ax.set_ylabel(METRIC_TITLES[metric])
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, plt, out)


def _save(fig, plt, out: str) -> str:
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m utils.visualize', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)

    maps = commands.add_parser('maps', help='token-mixing maps of chosen blocks of a checkpoint',
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    maps.add_argument('--checkpoint', required=True, help="a checkpoint: the authors' format or this project's")
    maps.add_argument('--blocks', nargs='+', required=True, metavar='S.B',
                      help='blocks to draw as STAGE.BLOCK, e.g. 0.0 2.1')
    maps.add_argument('--token', default='center',
                      help="output token inside the window: 'center', ROW,COL or an index ROW*w+COL")
    weights = maps.add_mutually_exclusive_group()
    weights.add_argument('--ema', dest='use_ema', action='store_const', const=True, default=None,
                         help='EMA weights (error if the checkpoint has none); default: EMA when present')
    weights.add_argument('--no-ema', dest='use_ema', action='store_const', const=False, help='live weights')
    maps.add_argument('--title', default=None, help='figure title (default: the checkpoint file name)')
    maps.add_argument('--out', required=True, help='PNG to write')

    curves = commands.add_parser('curves', help="loss and top-1 curves from runs' summary.csv",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    curves.add_argument('summaries', nargs='+', metavar='SUMMARY_CSV', help='summary.csv of one or more runs')
    curves.add_argument('--labels', nargs='+', default=None,
                        help='one per summary (default: run folder names); equal labels share a colour')
    curves.add_argument('--metrics', nargs='+', default=['loss', 'top1'], choices=CURVE_METRICS,
                        help='one panel each')
    curves.add_argument('--series', nargs='+', default=list(CURVE_SERIES), choices=CURVE_SERIES,
                        help='which curves of each run')
    curves.add_argument('--title', default=None, help='figure title')
    curves.add_argument('--out', required=True, help='PNG to write')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == 'maps':
            out = draw_token_maps(args.checkpoint, args.blocks, args.out, args.token, args.use_ema, args.title)
        else:
            out = draw_curves(args.summaries, args.out, args.labels, args.metrics, args.series, args.title)
    except (VisualizeError, CheckpointError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
