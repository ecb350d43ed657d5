"""Vision Permutator (ViP): MLPs that mix tokens along the height, the width and the channels apart.

Paper: "Vision Permutator: A Permutable MLP-Like Architecture for Visual Recognition" (Hou et al.,
IEEE TPAMI 2022, arXiv 2106.12368). Written for this project from the behaviour of the authors' model
(github.com/Andrew-Qibin/VisionPermutator, MIT license); it computes the same function and loads their
checkpoints through `checkpoint_filter_fn`, which maps their parameter names to these.

Layout: tokens live as (B, H, W, C). A Permute-MLP cuts the channels into `segment_dim` segments of
S = C / segment_dim channels and mixes, in each segment, all positions of one column (the h branch) or
one row (the w branch) with a Linear(H * S -> H * S); so H and W must equal `segment_dim`, and a model
takes exactly one input size (224 x 224 for the registered ones).
"""
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, PatchEmbed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
# timm exports no public name for it; its own models import it from here, as this one does.
from timm.models._features import feature_take_indices

from utils.weights_choice import training_weights

from .placement import build_placed

__all__ = ['VisionPermutator', 'WeightedPermuteMLP', 'checkpoint_filter_fn', 'read_architecture', 'stage_sides']


def stage_sides(img_side: int, patch_size: int, transitions: Sequence[bool]) -> List[int]:
    """The side of every stage's token map for an img_side x img_side input; transitions[i] (after stage
    i) halves it."""
    sides = [img_side // patch_size]
    for transition in transitions[:-1]:
        sides.append(sides[-1] // 2 if transition else sides[-1])
    return sides


class WeightedPermuteMLP(nn.Module):
    """Mix along the height (`mlp_h`), the width (`mlp_w`) and the channels (`mlp_c`), then sum the three
    branches with per-channel weights that a small MLP (`reweight`) makes from their pooled sum."""

    def __init__(self, dim: int, segment_dim: int, proj_drop: float = 0.):
        super().__init__()
        self.segment_dim = segment_dim
        self.mlp_c = nn.Linear(dim, dim, bias=False)
        self.mlp_h = nn.Linear(dim, dim, bias=False)
        self.mlp_w = nn.Linear(dim, dim, bias=False)
        self.reweight = Mlp(dim, dim // 4, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _mix_along(self, x: torch.Tensor, mlp: nn.Linear, axis: int) -> torch.Tensor:
        """Apply `mlp` to each segment's (positions along `axis`) x (segment channels) block: axis 1 is
        the height, 2 the width. (B, H, W, C) in and out."""
        segments = x.unflatten(-1, (self.segment_dim, -1)).movedim(axis, 3)  # (B, ., segment_dim, n, S)
        mixed = mlp(segments.flatten(3)).view(segments.shape)
        return mixed.movedim(3, axis).flatten(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        h = self._mix_along(x, self.mlp_h, axis=1)
        w = self._mix_along(x, self.mlp_w, axis=2)
        c = self.mlp_c(x)
        # Output unit 3 * k + j of `reweight` weights branch j of channel k.
        weights = self.reweight((h + w + c).mean(dim=(1, 2))).view(B, 1, 1, C, 3).softmax(-1)
        x = h * weights[..., 0] + w * weights[..., 1] + c * weights[..., 2]
        return self.proj_drop(self.proj(x))


class PermutatorBlock(nn.Module):
    """x + DropPath(PermuteMLP(LN(x))), then x + DropPath(Mlp(LN(x))), on (B, H, W, C) tokens."""

    def __init__(self, dim: int, segment_dim: int, mlp_ratio: float = 3., drop_path: float = 0.):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.permute_mlp = WeightedPermuteMLP(dim, segment_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.permute_mlp(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Downsample(nn.Module):
    """A conv between stages on (B, H, W, C) tokens: kernel = stride = 2 at a transition (it halves the
    map), 1 where only the width changes."""

    def __init__(self, in_dim: int, out_dim: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PermutatorStage(nn.Module):
    """(Downsample from the previous stage's width and map) -> Permutator blocks."""

    def __init__(self, in_dim: Optional[int], dim: int, transition: bool, depth: int, segment_dim: int,
                 mlp_ratio: float, drop_path: Sequence[float]):
        super().__init__()
        needs_downsample = in_dim is not None and (transition or in_dim != dim)
        self.downsample = Downsample(in_dim, dim, 2 if transition else 1) if needs_downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            PermutatorBlock(dim, segment_dim, mlp_ratio, drop_path[i]) for i in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing:
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class VisionPermutator(nn.Module):
    """ViP: a patch-embedding conv, stages of Permutator blocks, LayerNorm, average pool, linear head.

    Args (per-stage ones are sequences with one entry per stage, or one number for all; the names
    are the authors'):
        img_size: the input size; it must be patch_size * segment_dim[0], square (see `stage_sides`).
        patch_size: kernel and stride of the patch-embedding conv (7, or 14 for vip_s14).
        layers: blocks per stage.
        embed_dims: width of each stage.
        segment_dim: segments of each stage's Permute-MLP; equal to the side of the stage's token map.
        transitions: transitions[i] halves the map after stage i with a 2x2 stride-2 conv (the last
            entry is unused); a stage whose width differs from the next without one gets a 1x1 conv.
        mlp_ratios: hidden width of each stage's channel MLP, in multiples of its width.
        drop_rate: dropout before the head (the authors' code takes the rate but applies it nowhere).
        drop_path_rate: stochastic depth of the last block, rising linearly from 0 over all blocks.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            patch_size: int = 7,
            layers: Sequence[int] = (4, 3, 8, 3),
            embed_dims: Union[int, Sequence[int]] = (192, 384, 384, 384),
            segment_dim: Union[int, Sequence[int]] = (32, 16, 16, 16),
            transitions: Union[bool, Sequence[bool]] = (True, False, False, False),
            mlp_ratios: Union[float, Sequence[float]] = 3.,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        num_stages = len(layers)
        per_stage = dict(embed_dims=embed_dims, segment_dim=segment_dim, transitions=transitions,
                         mlp_ratios=mlp_ratios)
        for name, value in per_stage.items():
            if isinstance(value, (bool, int, float)):
                value = (value,) * num_stages  # one value for every stage
            if len(value) != num_stages:
                raise ValueError(f'ViP: {name} has {len(value)} entries but layers has {num_stages}; give one per '
                                 f'stage.')
            per_stage[name] = tuple(value)
        embed_dims, segment_dim, transitions, mlp_ratios = per_stage.values()
        _check_pooling(global_pool, num_classes)
        self.patch_size = patch_size
        self.segment_dim = segment_dim
        self.transitions = transitions
        self.img_size = to_2tuple(img_size)
        self._check_architecture(embed_dims)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]

        self.stem = PatchEmbed(self.img_size, patch_size, in_chans, embed_dims[0], output_fmt='NHWC',
                               strict_img_size=False)
        total = sum(layers)
        drop_path = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, self.feature_info, reduction = [], [], patch_size
        for i in range(num_stages):
            transition = i > 0 and transitions[i - 1]
            reduction *= 2 if transition else 1
            stages.append(PermutatorStage(
                embed_dims[i - 1] if i > 0 else None, embed_dims[i], transition, layers[i], segment_dim[i],
                mlp_ratios[i], drop_path[sum(layers[:i]):sum(layers[:i + 1])]))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module):
        # Convs keep PyTorch's default initialisation, as in the authors' model.
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def input_side(self) -> int:
        """The side of the one input size the model takes."""
        return self.patch_size * self.segment_dim[0]

    def _check_architecture(self, embed_dims: Sequence[int]):
        """The size first: a wrong one is the likeliest mistake, and its message names the segment_dim to give."""
        if self.img_size != (self.input_side, self.input_side):
            raise ValueError(self._size_problem(self.img_size) + self._segment_dim_hint(self.img_size, embed_dims))
        sides = stage_sides(self.input_side, self.patch_size, self.transitions)
        if sides != list(self.segment_dim):
            raise ValueError(
                f'ViP: segment_dim {self.segment_dim} does not fit transitions {self.transitions}: each stage\'s '
                f'segment_dim must be the side of its token map, which a transition halves '
                f'({tuple(sides)} after a {self.input_side}x{self.input_side} input).')
        for i, (dim, segments) in enumerate(zip(embed_dims, self.segment_dim)):
            if dim % segments:
                raise ValueError(f'ViP: stage {i} has {dim} channels, which do not split into segment_dim={segments} '
                                 f'segments; give a segment_dim that divides the width.')

    def _size_problem(self, size: Tuple[int, int]) -> str:
        side = self.input_side
        return (f'ViP takes only {side}x{side} input with patch_size {self.patch_size} and segment_dim '
                f'{self.segment_dim} (every stage\'s token map must have sides equal to its segment_dim), not '
                f'{size[0]}x{size[1]}.')

    def _segment_dim_hint(self, size: Tuple[int, int], embed_dims: Sequence[int]) -> str:
        """How to build a model for `size` instead, when one exists."""
        sides = stage_sides(size[0], self.patch_size, self.transitions)
        fits = (size[0] == size[1] and size[0] % self.patch_size == 0
                and all(s > 0 and s * 2 ** t == prev for s, t, prev in zip(sides[1:], self.transitions, sides))
                and all(s > 0 and dim % s == 0 for s, dim in zip(sides, embed_dims)))
        if fits:
            return f' For {size[0]}x{size[1]} input, build it with segment_dim={tuple(sides)}.'
        return f' Use img_size={self.input_side}.'

    def _check_input(self, x: torch.Tensor):
        if tuple(x.shape[-2:]) != (self.input_side, self.input_side):
            raise ValueError(self._size_problem(tuple(x.shape[-2:])) + f' Resize the input to '
                             f'{self.input_side}x{self.input_side}, or build a model for its size '
                             f'(img_size and a segment_dim to match).')

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        _check_pooling(self.global_pool if global_pool is None else global_pool, num_classes)
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs as (B, C, H, W) maps (or NHWC); `norm` applies the final norm to the last one."""
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"ViP.forward_intermediates: output_fmt={output_fmt!r}; use 'NCHW' or 'NHWC'.")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        self._check_input(x)
        x = self.stem(x)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(y if output_fmt == 'NHWC' else y.permute(0, 3, 1, 2))
        if intermediates_only:
            return intermediates
        if len(stages) - 1 == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last one `indices` asks for (and the norm/head if asked)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> normalised last-stage tokens (B, H / 2^k / patch, W / ..., C), channels last."""
        self._check_input(x)
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_pooling(global_pool: str, num_classes: int):
    if global_pool not in ('avg', ''):
        raise ValueError(f"ViP: global_pool={global_pool!r}; use 'avg' or '' (no pooling).")
    if global_pool == '' and num_classes > 0:
        raise ValueError(f"ViP: global_pool='' keeps the (B, H, W, C) map, which a {num_classes}-class head cannot "
                         f"classify; use global_pool='avg', or num_classes=0 for features.")


def _network_entry_names(keys) -> Dict[int, str]:
    """Where each entry of the authors' flat `network` list goes here. The list holds each stage's blocks,
    with a Downsample entry between two stages where the map or the width changes; a Downsample opens
    the next stage, and two block entries in a row are two stages."""
    entries = sorted({int(m.group(1)) for k in keys if (m := re.match(r'network\.(\d+)\.', k))})
    downsamples = {int(m.group(1)) for k in keys if (m := re.match(r'network\.(\d+)\.proj\.', k))}
    names, stage, opened_by_downsample = {}, -1, False
    for entry in entries:
        if entry in downsamples:
            stage += 1
            names[entry] = f'stages.{stage}.downsample'
        else:
            stage += 0 if opened_by_downsample else 1
            names[entry] = f'stages.{stage}.blocks'
        opened_by_downsample = entry in downsamples
    return names


def checkpoint_filter_fn(state_dict: dict, model: Optional[nn.Module] = None) -> dict:
    """The authors' parameter names (or this project's) in this module's layout:
    `patch_embed.` -> `stem.`, `network.{k}.` -> `stages.{i}.blocks.` or `stages.{i}.downsample.`,
    `.attn.` -> `.permute_mlp.`. Takes a whole training checkpoint too (its EMA weights when present)."""
    state_dict = training_weights(state_dict, model)
    entry_names = _network_entry_names(state_dict)
    out = {}
    for name, value in state_dict.items():
        name = re.sub(r'^patch_embed\.', 'stem.', name)
        name = re.sub(r'^network\.(\d+)\.', lambda m: entry_names[int(m.group(1))] + '.', name)
        out[re.sub(r'\.attn\.', '.permute_mlp.', name)] = value
    return out


def _indices(keys, pattern: str) -> List[int]:
    return sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})


def read_architecture(state_dict: Dict[str, torch.Tensor]) -> Optional[Tuple[str, Dict[str, Any]]]:
    """(registered name, model arguments) of the ViP whose weights these are (the authors' names or these),
    None when they are no ViP. The weights do not show the input size: it is taken to be 224, the size
    the authors trained at, which sets segment_dim."""
    state_dict = checkpoint_filter_fn(state_dict)
    stages = _indices(state_dict, r'stages\.(\d+)\.blocks\.')
    if 'stem.proj.weight' not in state_dict or not stages or f'stages.{stages[0]}.blocks.0.permute_mlp.mlp_h.weight' \
            not in state_dict:
        return None
    stem = state_dict['stem.proj.weight']
    patch_size = stem.shape[-1]
    kwargs = dict(patch_size=patch_size, in_chans=stem.shape[1], layers=[], embed_dims=[], mlp_ratios=[],
                  transitions=[])
    for i in stages:
        prefix = f'stages.{i}.'
        dim = state_dict[prefix + 'blocks.0.norm1.weight'].shape[0]
        hidden = state_dict[prefix + 'blocks.0.mlp.fc1.weight'].shape[0]
        kwargs['layers'].append(len(_indices(state_dict, re.escape(prefix) + r'blocks\.(\d+)\.')))
        kwargs['embed_dims'].append(dim)
        kwargs['mlp_ratios'].append(hidden / dim if hidden % dim else hidden // dim)
        downsample = state_dict.get(f'stages.{i + 1}.downsample.proj.weight')
        kwargs['transitions'].append(downsample is not None and downsample.shape[-1] == 2)
    kwargs['segment_dim'] = stage_sides(224, patch_size, kwargs['transitions'])
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    kwargs['num_classes'] = state_dict['head.weight'].shape[0] if 'head.weight' in state_dict else 0
    architecture = {k: kwargs[k] for k in ('patch_size', 'layers', 'embed_dims', 'transitions')}
    name = next((n for n, v in VARIANTS.items() if {k: v[k] for k in architecture} == architecture), 'vip_s7')
    return name, kwargs


def _create_vip(variant: str, pretrained: bool = False, **kwargs) -> VisionPermutator:
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('layers', VARIANTS[variant]['layers'])))))
    return build_placed(
        build_model_with_cfg, VisionPermutator, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(crop_pct: float = 0.9):
    return dict(
        num_classes=1000, input_size=(3, 224, 224), pool_size=None, fixed_input_size=True, crop_pct=crop_pct,
        interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv='stem.proj',
        classifier='head', paper_ids='arXiv:2106.12368',
        paper_name='Vision Permutator: A Permutable MLP-Like Architecture for Visual Recognition',
        origin_url='https://github.com/Andrew-Qibin/VisionPermutator', license='mit',
    )


# The authors' eval crops: 0.9 for their small and medium models, 0.875 for the large one.
default_cfgs = generate_default_cfgs({
    'vip_s14': _cfg(),
    'vip_s7': _cfg(),
    'vip_m7': _cfg(),
    'vip_l7': _cfg(crop_pct=0.875),
})

VARIANTS = dict(
    vip_s14=dict(patch_size=14, layers=(4, 3, 8, 3), embed_dims=(384, 384, 384, 384), segment_dim=(16, 16, 16, 16),
                 transitions=(False, False, False, False)),
    vip_s7=dict(patch_size=7, layers=(4, 3, 8, 3), embed_dims=(192, 384, 384, 384), segment_dim=(32, 16, 16, 16),
                transitions=(True, False, False, False)),
    vip_m7=dict(patch_size=7, layers=(4, 3, 14, 3), embed_dims=(256, 256, 512, 512), segment_dim=(32, 32, 16, 16),
                transitions=(False, True, False, False)),
    vip_l7=dict(patch_size=7, layers=(8, 8, 16, 4), embed_dims=(256, 512, 512, 512), segment_dim=(32, 16, 16, 16),
                transitions=(True, False, False, False)),
)


def _vip(variant: str, pretrained: bool, **kwargs) -> VisionPermutator:
    return _create_vip(variant, pretrained=pretrained, **{**VARIANTS[variant], 'mlp_ratios': 3., **kwargs})


@register_model
def vip_s14(pretrained: bool = False, **kwargs) -> VisionPermutator:
    """ViP-Small/14: patch 14, width 384 throughout, 29.9M parameters."""
    return _vip('vip_s14', pretrained, **kwargs)


@register_model
def vip_s7(pretrained: bool = False, **kwargs) -> VisionPermutator:
    """ViP-Small/7: 25.1M parameters, 81.5 top-1 in the paper."""
    return _vip('vip_s7', pretrained, **kwargs)


@register_model
def vip_m7(pretrained: bool = False, **kwargs) -> VisionPermutator:
    """ViP-Medium/7: 55.3M parameters, 82.7 top-1 in the paper."""
    return _vip('vip_m7', pretrained, **kwargs)


@register_model
def vip_l7(pretrained: bool = False, **kwargs) -> VisionPermutator:
    """ViP-Large/7: 87.8M parameters, 83.2 top-1 in the paper."""
    return _vip('vip_l7', pretrained, **kwargs)
