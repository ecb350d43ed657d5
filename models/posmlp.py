"""PosMLP: vision MLPs whose token mixing is generated from relative positions.

Paper: "Parameterization of Cross-Token Relations with Relative Positional Encoding for Vision MLP"
(Wang et al., ACM MM 2022, arXiv 2207.07284).

The spatial gating unit of gMLP mixes tokens with one learned N x N matrix. PoSGU instead generates
the mixing map from relative positions inside a local window, one map per channel group:
  * GQPE: a 2-D Gaussian over the relative offset (learned centre and covariance), softmax-normalised;
  * LRPE: a learned weight per relative offset, used as is.
gMLP's SGU is kept as the ablation baseline (`gate='sgu'`).

Layout: the stem and downsampling work on (B, C, H, W); each stage partitions its map into
w x w windows, (B, nW, N, C) with N = w * w, and its blocks work there.
"""
import copy
import errno
import logging
import math
import os
import re
from collections import OrderedDict
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath, get_act_layer, get_norm_layer, resample_abs_pos_embed, resize_rel_pos_bias_table, trunc_normal_,
)
from timm.models import (
    build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model, reparameterize_model,
)
# timm exports no public name for it; its own models import it from here, as this one does.
from timm.models._features import feature_take_indices

from utils.weights_choice import training_weights

from .placement import build_placed
from .posmlp_fast import channel_major_mlp

__all__ = [
    'PosMLP', 'PoSGU', 'SGU', 'GQPE', 'LRPE', 'VARIANT_EMBED_DIMS', 'checkpoint_filter_fn', 'level_sizes',
    'resample_to_windows', 'valid_img_sizes',
]

_logger = logging.getLogger(__name__)

LN_EPS = 1e-6
BN_EPS = 1e-6  # the stem's BatchNorms, as the authors' code has them
GATES = ('gqpe', 'lrpe', 'sgu')
GATE_IMPLS = ('fast', 'reference')
# GQPE weights below this are set to 0 on the CPU (see GQPE.forward).
MAP_FLOOR = 1e-30


def window_partition(x: torch.Tensor, win: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, win * win, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // win, win, W // win, win, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, -1, win * win, C)


def window_reverse(windows: torch.Tensor, win: int, H: int, W: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B, nW, win * win, C) -> (B, H, W, C)."""
    B, _, _, C = windows.shape
    x = windows.view(B, H // win, W // win, win, win, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


def relative_offsets(win: int, device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Offsets (dx, dy) between every output token m and input token n of a window, shape (N, N).

    dx = c_n - c_m and dy = r_m - r_n: the authors' sign conventions, which their checkpoints rely on.
    """
    steps = torch.arange(win, device=device)
    rows, cols = torch.meshgrid(steps, steps, indexing='ij')
    rows, cols = rows.flatten(), cols.flatten()
    dx = cols[None, :] - cols[:, None]
    dy = rows[:, None] - rows[None, :]
    return dx, dy


def level_sizes(img_size: Tuple[int, int], num_stages: int) -> List[Tuple[int, int]]:
    """(H, W) of every stage's map: the stem halves twice, each later stage once (ceil, as the convs do)."""
    h, w = img_size
    sizes = []
    for i in range(num_stages):
        for _ in range(2 if i == 0 else 1):
            h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    return sizes


def _side_fits(side: int, win_size: Sequence[int]) -> bool:
    sizes = level_sizes((side, side), len(win_size))
    return all(s[0] % w == 0 for s, w in zip(sizes, win_size))


def valid_img_sizes(near: int, win_size: Sequence[int]) -> Tuple[Optional[int], Optional[int]]:
    """The nearest image sides below and above `near` whose level maps all divide by the windows.

    The stem rounds up, so valid sides come in runs (221..224 all give 56); the top of a run, the
    exact multiple, is the one named.
    """
    below = next((s for s in range(near, 0, -1) if _side_fits(s, win_size)), None)
    step = 2 ** (len(win_size) + 1) * math.lcm(*win_size)
    above = next((s for s in range(near + 1, near + step + 1) if _side_fits(s, win_size)), None)
    while above is not None and _side_fits(above + 1, win_size):
        above += 1
    return below, above


def _rebuild_derived_buffers(module: nn.Module, incompatible_keys) -> None:
    """load_state_dict post-hook: the buffers derived from the window size are not in state dicts, so a
    model built on the meta device (then `to_empty` or `assign=True`) gets them here, on its weights' device."""
    module.init_non_persistent_buffers()


class GQPE(nn.Module):
    """Generalized quadratic positional encoding: one softmax-normalised Gaussian map per group.

    score_g[m, n] = -1/2 (D_mn - delta_g)^T A_g (D_mn - delta_g) with D_mn = (dx, dy), A_g = S_g S_g^T;
    the constant term is dropped because the softmax over n removes it. The non-generalized form has
    a scalar spread s_g per group: score = s^2 (delta . D) - |D|^2 / 2.
    """

    def __init__(self, win_size: int, gamma: int, generalized: bool = True, init_std: float = 0.01):
        super().__init__()
        self.win_size = win_size
        self.gamma = gamma
        self.generalized = generalized
        self.init_std = init_std
        self.centers = nn.Parameter(torch.empty(gamma, 2))
        self.spreads = nn.Parameter(torch.empty(gamma, 2, 2) if generalized else torch.empty(gamma))
        self.register_buffer('rel_features', self._relative_features(), persistent=False)
        self.register_load_state_dict_post_hook(_rebuild_derived_buffers)
        self.init_weights()

    def _relative_features(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """(F, N, N): the scores of all groups are then one contiguous (gamma, F) x (F, N * N) product."""
        dx, dy = relative_offsets(self.win_size, device)
        if self.generalized:
            features = [dx, dy, dx ** 2, dy ** 2, dx * dy]
        else:
            features = [dx, dy, dx ** 2 + dy ** 2]
        return torch.stack(features).float()

    def init_non_persistent_buffers(self):
        """Recompute `rel_features` on the parameters' device, keeping its dtype (timm's hook, see
        `timm.models.reinit_non_persistent_buffers`): after building on the meta device and `to_empty`."""
        with torch.inference_mode(False):  # a load under inference_mode must not make training impossible
            self.rel_features = self._relative_features(self.centers.device).to(self.rel_features.dtype)

    def init_weights(self):
        nn.init.normal_(self.centers, std=self.init_std)
        nn.init.normal_(self.spreads, std=self.init_std)
        with torch.no_grad():
            self.spreads.add_(torch.eye(2) if self.generalized else torch.ones(()))

    def feature_weights(self) -> torch.Tensor:
        """Weights of the relative-position features for every group, (gamma, F)."""
        d1, d2 = self.centers.unbind(-1)
        if self.generalized:
            A = self.spreads @ self.spreads.transpose(-1, -2)
            a, b, c, d = A[:, 0, 0], A[:, 0, 1], A[:, 1, 1], A[:, 1, 0]
            return torch.stack([a * d1 + b * d2, c * d2 + d * d1, -a / 2, -c / 2, -(b + d) / 2], -1)
        s2 = self.spreads ** 2
        return torch.stack([s2 * d1, s2 * d2, torch.full_like(d1, -0.5)], -1)

    def forward(self, invalid_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mixing maps, (gamma, N, N), in float32 or the parameters' dtype if wider (float64); with an
        (nW, N) mask of padded tokens, (nW, gamma, N, N)."""
        # The Gaussian scores and their softmax stay in float32 under autocast and in half-precision models.
        dtype = torch.promote_types(self.centers.dtype, torch.float32)
        with torch.autocast(self.centers.device.type, enabled=False):
            scores = self.feature_weights().to(dtype) @ self.rel_features.flatten(1).to(dtype)
            scores = scores.unflatten(1, self.rel_features.shape[1:])
            if invalid_tokens is not None:
                scores = scores.masked_fill(invalid_tokens[:, None, None, :], float('-inf'))
            maps = scores.softmax(-1)
            if maps.device.type != 'cpu':
                return maps
            # Far from its centre the Gaussian falls below 1e-30 and on to subnormal numbers, whose
            # products x86 CPUs compute many times slower (logs/benchmark_cpu_2026-11-30.md); such
            # weights change no float32 sum, so on the CPU they are set to 0.
            return maps.masked_fill(maps < MAP_FLOOR, 0.)


class LRPE(nn.Module):
    """Learnable relative positional encoding: one weight per relative offset and group, no softmax."""

    def __init__(self, win_size: int, gamma: int):
        super().__init__()
        self.win_size = win_size
        self.gamma = gamma
        self.table = nn.Parameter(torch.empty((2 * win_size - 1) ** 2, gamma))
        self.register_buffer('rel_index', self._relative_index(), persistent=False)
        self.register_load_state_dict_post_hook(_rebuild_derived_buffers)
        self.init_weights()

    def _relative_index(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """(N, N) rows of `table`. Row offset r_m - r_n is dy and column offset c_m - c_n is -dx;
        both shifted to be non-negative."""
        win = self.win_size
        dx, dy = relative_offsets(win, device)
        return (dy + win - 1) * (2 * win - 1) + (win - 1 - dx)

    def init_non_persistent_buffers(self):
        """Recompute `rel_index` on the table's device (timm's hook, see
        `timm.models.reinit_non_persistent_buffers`): after building on the meta device and `to_empty`."""
        with torch.inference_mode(False):  # a load under inference_mode must not make training impossible
            self.rel_index = self._relative_index(self.table.device)

    def init_weights(self):
        trunc_normal_(self.table, std=0.02)

    def forward(self, invalid_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mixing maps, (gamma, N, N); with an (nW, N) mask of padded tokens, (nW, gamma, N, N)."""
        maps = self.table[self.rel_index].permute(2, 0, 1)
        if invalid_tokens is not None:
            maps = maps.masked_fill(invalid_tokens[:, None, None, :], 0.)
        return maps


class FrozenMaps(nn.Module):
    """An encoder's maps made once, for inference (`PoSGU.fuse()`): they depend on parameters, not on inputs.

    Padded inputs still make their masked maps from the encoder, which is kept. The maps are a persistent
    buffer, so the fused model's state dict carries them along with the parameters they were made from.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        with torch.no_grad():
            self.register_buffer('maps', encoder())

    def train(self, mode: bool = True) -> 'FrozenMaps':
        # Training would leave the stored maps behind the parameters they came from, which would still be
        # optimised (and decayed) without effect: refuse rather than train a different model silently.
        if mode:
            raise RuntimeError('a fused PosMLP is for inference: its positional maps are stored, so training '
                               'would not update them. Train the model before fuse(), or rebuild it unfused from '
                               'its weights (models.create_model_from_checkpoint).')
        return super().train(False)

    def forward(self, invalid_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.maps if invalid_tokens is None else self.encoder(invalid_tokens)


def mix_groups(u: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Group-wise token mixing: out[.., m, k] = sum_n maps[g, m, n] u[.., n, k], g = k % gamma.
    u: (B, nW, N, D); maps: (gamma, N, N), or (nW, gamma, N, N) per window."""
    B, nW, N, D = u.shape
    gamma = maps.shape[-3]
    u = u.reshape(B, nW, N, D // gamma, gamma)
    if maps.dim() == 3:
        out = torch.einsum('gmn,bwnjg->bwmjg', maps, u)
    else:
        out = torch.einsum('wgmn,bwnjg->bwmjg', maps, u)
    return out.reshape(B, nW, N, D)


class PoSGU(nn.Module):
    """Positional spatial gating unit: (mix(u) + token_bias) * v, one generated map per channel group."""

    def __init__(self, dim: int, win_size: int, gamma: int, pos_enc: str = 'gqpe', generalized: bool = True):
        super().__init__()
        gate_dim = dim // 2
        if dim % 2 or gate_dim % gamma:
            raise ValueError(f'PoSGU: half of the hidden width ({dim} / 2) must divide into gamma={gamma} groups.')
        self.gamma = gamma
        self.pos = GQPE(win_size, gamma, generalized) if pos_enc == 'gqpe' else LRPE(win_size, gamma)
        self.token_bias = nn.Parameter(torch.zeros(1, win_size * win_size, 1))

    def forward(self, x: torch.Tensor, invalid_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        u, v = x.chunk(2, dim=-1)
        mixed = mix_groups(u, self.pos(invalid_tokens).to(u.dtype))
        return (mixed + self.token_bias) * v

    def fuse(self) -> 'PoSGU':
        """For inference, in place: the positional maps made once and stored (see `FrozenMaps`)."""
        if not isinstance(self.pos, FrozenMaps):
            self.pos = FrozenMaps(self.pos)
        return self


class SGU(nn.Module):
    """gMLP's spatial gating unit inside a window (the paper's baseline): (W norm(u) + b) * v."""

    def __init__(self, dim: int, win_size: int, norm_layer: Callable = partial(nn.LayerNorm, eps=LN_EPS)):
        super().__init__()
        num_tokens = win_size * win_size
        self.norm = norm_layer(dim // 2)
        self.proj = nn.Linear(num_tokens, num_tokens)
        self.init_weights()

    def init_weights(self):
        # Near-identity gating at the start of training, as in gMLP.
        nn.init.normal_(self.proj.weight, std=1e-6)
        nn.init.ones_(self.proj.bias)

    def forward(self, x: torch.Tensor, invalid_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        u, v = x.chunk(2, dim=-1)
        weight = self.proj.weight
        if invalid_tokens is not None:
            weight = weight.masked_fill(invalid_tokens[:, None, :], 0.)
        u = torch.matmul(weight, self.norm(u)) + self.proj.bias[:, None]
        return u * v


class PosMLPBlock(nn.Module):
    """x + DropPath(Dropout(fc2(gate(act(fc1(norm(x))))))) on windowed tokens (B, nW, N, C).

    gate_impl='fast' (PoSGU gates only) runs fc1 -> act -> gate -> fc2 as one channel-major piece,
    `channel_major_mlp` (models/posmlp_fast.py), as timm's blocks run fused attention: it reads fc1's
    and fc2's weights and the gate's token bias, so hooks on fc1, fc2 and the gate do not fire there, and
    modules put in their place are not called; act and the gate's positional encoder are still called
    as modules (act on (channels, tokens)).
    'reference' calls every sub-module. Both compute the same function of the same state dict.
    """

    def __init__(
            self,
            dim: int,
            win_size: int,
            gamma: int,
            mlp_ratio: float = 4.,
            gate: str = 'gqpe',
            generalized: bool = True,
            gate_impl: str = 'fast',
            drop: float = 0.,
            drop_path: float = 0.,
            norm_layer: Callable = partial(nn.LayerNorm, eps=LN_EPS),
            act_layer: Callable = nn.GELU,
    ):
        super().__init__()
        if gate_impl not in GATE_IMPLS:
            raise ValueError(f'PosMLPBlock: gate_impl={gate_impl!r} is not one of {GATE_IMPLS}.')
        hidden = int(mlp_ratio * dim)
        self.norm = norm_layer(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        if gate == 'sgu':
            self.gate = SGU(hidden, win_size, norm_layer)
        else:
            self.gate = PoSGU(hidden, win_size, gamma, gate, generalized)
        self.fc2 = nn.Linear(hidden // 2, dim)
        self.drop = nn.Dropout(drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.channel_major = gate_impl == 'fast' and gate != 'sgu'

    def forward(self, x: torch.Tensor, invalid_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.channel_major:
            y = channel_major_mlp(self.norm(x), self.fc1, self.act, self.gate, self.fc2, invalid_tokens)
        else:
            y = self.fc2(self.gate(self.act(self.fc1(self.norm(x))), invalid_tokens))
        return x + self.drop_path(self.drop(y))


class ConvStem(nn.Module):
    """Stride-4 convolutional patch embedding: two 3x3 stride-2 convs and a 1x1 conv, each with BN."""

    def __init__(
            self,
            in_chans: int,
            dim: int,
            norm_layer: Callable = partial(nn.BatchNorm2d, eps=BN_EPS),
            act_layer: Callable = nn.GELU,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.norm1 = norm_layer(dim // 2)
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm2 = norm_layer(dim)
        self.conv3 = nn.Conv2d(dim, dim, 1)
        self.norm3 = norm_layer(dim)
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.conv1(x)))
        x = self.act(self.norm2(self.conv2(x)))
        return self.norm3(self.conv3(x))

    def fuse(self) -> nn.Module:
        """For inference: each BatchNorm folded into its conv, with its running statistics."""
        convs = [fuse_conv_bn_eval(conv.eval(), norm.eval()) for conv, norm in (
            (self.conv1, self.norm1), (self.conv2, self.norm2), (self.conv3, self.norm3))]
        return nn.Sequential(OrderedDict(
            conv1=convs[0], act1=self.act, conv2=convs[1], act2=copy.deepcopy(self.act), conv3=convs[2]))


class ConvDownsample(nn.Module):
    """Patch merging between stages: grouped 3x3 stride-2 conv (C -> 2C), then norm; NCHW -> NHWC."""

    def __init__(self, in_dim: int, out_dim: int, norm_layer: Callable = partial(nn.LayerNorm, eps=LN_EPS)):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, groups=in_dim)
        self.norm = norm_layer(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class PosMLPStage(nn.Module):
    """(downsample) -> window partition -> blocks -> window reverse; (B, C, H, W) in and out.

    A map that does not divide into windows is padded at the bottom and right; the padded tokens are
    kept out of the token mixing and cropped off afterwards, so they never reach a real token.
    """

    def __init__(
            self,
            in_dim: Optional[int],
            dim: int,
            depth: int,
            win_size: int,
            gamma: int,
            mlp_ratio: float,
            drop_path: Sequence[float],
            norm_layer: Callable = partial(nn.LayerNorm, eps=LN_EPS),
            **block_kwargs,
    ):
        super().__init__()
        self.win_size = win_size
        self.downsample = ConvDownsample(in_dim, dim, norm_layer) if in_dim is not None else None
        self.blocks = nn.Sequential(*[
            PosMLPBlock(dim, win_size, gamma, mlp_ratio, drop_path=drop_path[i], norm_layer=norm_layer, **block_kwargs)
            for i in range(depth)
        ])
        self.grad_checkpointing = False

    def _invalid_tokens(self, H: int, W: int, Hp: int, Wp: int, device: torch.device) -> torch.Tensor:
        valid = torch.zeros(1, Hp, Wp, 1, dtype=torch.bool, device=device)
        valid[:, :H, :W] = True
        return ~window_partition(valid, self.win_size)[0, ..., 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x) if self.downsample is not None else x.permute(0, 2, 3, 1)
        B, H, W, C = x.shape
        win = self.win_size
        pad_h, pad_w = -H % win, -W % win
        invalid = None
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
            invalid = self._invalid_tokens(H, W, H + pad_h, W + pad_w, x.device)
        x = window_partition(x, win)
        if invalid is None and self.grad_checkpointing:
            x = checkpoint_seq(self.blocks, x)
        elif invalid is None:
            x = self.blocks(x)
        else:
            for block in self.blocks:
                if self.grad_checkpointing:
                    x = torch.utils.checkpoint.checkpoint(block, x, invalid, use_reentrant=False)
                else:
                    x = block(x, invalid)
        x = window_reverse(x, win, H + pad_h, W + pad_w)[:, :H, :W]
        return x.permute(0, 3, 1, 2)


def _check_pooling(global_pool: str, num_classes: int):
    if global_pool not in ('avg', ''):
        raise ValueError(f"PosMLP: global_pool={global_pool!r}; use 'avg' or '' (no pooling).")
    if global_pool == '' and num_classes > 0:
        raise ValueError(f"PosMLP: global_pool='' keeps the (B, C, H, W) map, which a {num_classes}-class head "
                         f"cannot classify; use global_pool='avg', or num_classes=0 for features.")


class PosMLP(nn.Module):
    """PosMLP: a conv stem, four stages of windowed PosMLP blocks, LayerNorm, average pool, linear head.

    Args:
        img_size: nominal input size; with `dynamic_img_pad=False` every input must fit the windows.
        depths: blocks per stage; their number sets the number of stages.
        win_size, gamma, embed_dims, mlp_ratio: per stage, or one number for every stage.
        gate: 'gqpe' (the paper's models), 'lrpe', or 'sgu' (gMLP's gate, the ablation baseline).
        generalized: full 2x2 covariance for GQPE (the paper's default) or one scalar spread per group.
        gate_impl: 'fast' (each PoSGU block's MLP as one channel-major piece, see `models/posmlp_fast.py`) or
            'reference' (module by module); the same function and state dict.
        drop_rate: dropout after every block's output projection and before the head.
        dynamic_img_pad: pad maps that do not divide into windows and mask the padding out of the
            mixing; when False, such inputs raise an error naming the sizes that fit.
        norm_layer: the token norm (blocks, downsampling, SGU, final); LayerNorm with eps 1e-6 by default.
        act_layer: the activation (blocks and stem); GELU by default. Both take timm's layer names too.

    `fuse()` (or timm's `reparameterize_model`) turns a model into its inference form: the stem's
    BatchNorms folded into its convs, the positional maps made once and stored.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Union[int, Sequence[int]] = (96, 192, 384, 768),
            depths: Sequence[int] = (2, 2, 18, 2),
            mlp_ratio: Union[float, Sequence[float]] = (4, 4, 4, 2),
            gamma: Union[int, Sequence[int]] = (8, 16, 32, 64),
            win_size: Union[int, Sequence[int]] = (14, 14, 14, 7),
            gate: str = 'gqpe',
            generalized: bool = True,
            gate_impl: str = 'fast',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            dynamic_img_pad: bool = True,
            norm_layer: Optional[Union[str, Callable]] = None,
            act_layer: Optional[Union[str, Callable]] = None,
    ):
        super().__init__()
        num_stages = len(depths)
        per_stage = dict(embed_dims=embed_dims, mlp_ratio=mlp_ratio, gamma=gamma, win_size=win_size)
        for name, value in per_stage.items():
            if isinstance(value, (int, float)):
                value = per_stage[name] = (value,) * num_stages  # one value for every stage
            if len(value) != num_stages:
                raise ValueError(f'PosMLP: {name} has {len(value)} entries but depths has {num_stages}; give one per stage.')
        embed_dims, mlp_ratio, gamma, win_size = per_stage.values()
        if gate not in GATES:
            raise ValueError(f'PosMLP: gate={gate!r} is not one of {GATES}.')
        _check_pooling(global_pool, num_classes)
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.win_size = tuple(win_size)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.drop_rate = drop_rate
        self.dynamic_img_pad = dynamic_img_pad
        if not dynamic_img_pad:
            self.check_input_size(self.img_size)

        norm_layer = get_norm_layer(norm_layer) if norm_layer is not None else partial(nn.LayerNorm, eps=LN_EPS)
        act_layer = get_act_layer(act_layer) if act_layer is not None else nn.GELU
        self.stem = ConvStem(in_chans, embed_dims[0], act_layer=act_layer)
        total = sum(depths)
        drop_path = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages = []
        self.feature_info = []
        for i in range(num_stages):
            stages.append(PosMLPStage(
                embed_dims[i - 1] if i > 0 else None, embed_dims[i], depths[i], win_size[i], gamma[i],
                mlp_ratio[i], drop_path[sum(depths[:i]):sum(depths[:i + 1])],
                gate=gate, generalized=generalized, gate_impl=gate_impl, drop=drop_rate,
                norm_layer=norm_layer, act_layer=act_layer,
            ))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        for module in self.modules():
            if isinstance(module, (GQPE, LRPE, SGU)):
                module.init_weights()

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def check_input_size(self, img_size: Tuple[int, int]):
        """Raise if some stage's map does not divide into its windows (only without dynamic_img_pad)."""
        sizes = level_sizes(img_size, len(self.win_size))
        for i, ((h, w), win) in enumerate(zip(sizes, self.win_size)):
            if h % win or w % win:
                hints = [
                    f'{" or ".join(str(s) for s in dict.fromkeys(valid_img_sizes(side, self.win_size)) if s)} '
                    f'instead of {side}'
                    for side in dict.fromkeys(img_size) if not _side_fits(side, self.win_size)
                ]
                raise ValueError(
                    f'PosMLP: input {img_size[0]}x{img_size[1]} gives a {h}x{w} map at stage {i}, which does not '
                    f'divide into {win}x{win} windows (windows {self.win_size}). Sides that fit nearby: '
                    f'{"; ".join(hints)}; or build the model with dynamic_img_pad=True to pad every stage.'
                )

    def fuse(self) -> 'PosMLP':
        """This model, in place, in its inference form (timm's `reparameterize_model` convention): the
        stem's BatchNorms folded into its convs with their running statistics, and each positional
        encoder's maps made once and stored. Put it in eval mode; train and load weights before."""
        return reparameterize_model(self.eval(), inplace=True)

    def no_weight_decay(self):
        """Nothing beyond timm's default (1-D parameters and biases): the authors' recipe decays the
        positional parameters (GQPE centres/spreads, LRPE tables, token bias) like any weight; only the
        1-D spreads of generalized=False GQPE fall under the default exemption."""
        return set()

    def group_matcher(self, coarse: bool = False):
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

    def _check_input(self, x: torch.Tensor):
        if not self.dynamic_img_pad:
            self.check_input_size(tuple(x.shape[-2:]))

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
            raise ValueError(f"PosMLP.forward_intermediates: output_fmt={output_fmt!r}; use 'NCHW' or 'NHWC'.")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        self._check_input(x)
        x = self.stem(x)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self._final_norm(x) if norm and i == last else x
                intermediates.append(y.permute(0, 2, 3, 1) if output_fmt == 'NHWC' else y)
        if intermediates_only:
            return intermediates
        if len(stages) - 1 == last:
            x = self._final_norm(x)
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

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normalised last-stage map (B, C, H/32, W/32)."""
        self._check_input(x)
        x = self.stages(self.stem(x))
        return self._final_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# The authors' parameter names (left) in this module's layout (right); their relative-position
# index buffers are rebuilt here from the window size, so they are dropped.
_AUTHOR_KEY_RENAMES = (
    (r'^patch_embed\.projs\.(\d)\.', lambda m: f'stem.conv{int(m.group(1)) + 1}.'),
    (r'^patch_embed\.norms\.(\d)\.', lambda m: f'stem.norm{int(m.group(1)) + 1}.'),
    (r'^levels\.(\d+)\.pool\.', r'stages.\1.downsample.'),
    (r'^levels\.(\d+)\.encoder\.(\d+)\.', r'stages.\1.blocks.\2.'),
    (r'\.proj_c_e\.', '.fc1.'),
    (r'\.proj_c_s\.', '.fc2.'),
    (r'\.gate_unit\.pos\.token_proj_n_bias$', '.gate.token_bias'),
    (r'\.gate_unit\.pos\.attention_centers$', '.gate.pos.centers'),
    (r'\.gate_unit\.pos\.attention_spreads$', '.gate.pos.spreads'),
    (r'\.gate_unit\.pos\.window_relative_position_bias_table$', '.gate.pos.table'),
    (r'\.gate_unit\.norm_list\.0\.', '.gate.norm.'),
    (r'\.gate_unit\.proj_list\.0\.', '.gate.proj.'),
)
_AUTHOR_DERIVED_BUFFERS = ('gate_unit.pos.rel_indices', 'gate_unit.pos.window_relative_position_index')


def checkpoint_filter_fn(state_dict: dict, model: Optional[nn.Module] = None) -> dict:
    """Adapt a checkpoint (the authors' layout or this project's) to this module's parameter names, and
    given a PosMLP with other windows, its window-sized weights to them (`resample_to_windows`).

    Accepts a whole training checkpoint too: its EMA weights are used when present, as the authors
    evaluated with them (pick other weights with `models.create_model_from_checkpoint`).
    """
    out = {}
    for name, value in training_weights(state_dict, model).items():
        if name.endswith(_AUTHOR_DERIVED_BUFFERS):
            continue
        for pattern, replacement in _AUTHOR_KEY_RENAMES:
            name = re.sub(pattern, replacement, name)
        out[name] = value
    return resample_to_windows(out, model) if isinstance(model, PosMLP) else out


def resample_to_windows(state_dict: Dict[str, torch.Tensor], model: 'PosMLP') -> Dict[str, torch.Tensor]:
    """Fit the window-sized weights of `state_dict` to the model's windows (the image size changes none).

    GQPE's centres and spreads define its Gaussian at any offset: they carry over unchanged. LRPE tables
    are resampled with timm's `resize_rel_pos_bias_table`, token biases bicubically on the window grid
    (timm's `resample_abs_pos_embed`). SGU's N x N matrices have no relative form to resample: refused.
    """
    own = model.state_dict()
    out, changed = dict(state_dict), {}
    for name, value in state_dict.items():
        target = own.get(name)
        if target is None or target.shape == value.shape or not name.startswith('stages.'):
            continue
        stage = int(name.split('.')[1])
        new = model.stages[stage].win_size
        if name.endswith('.gate.token_bias'):
            old = math.isqrt(value.shape[1])
            out[name] = resample_abs_pos_embed(value, [new, new], [old, old], num_prefix_tokens=0)
        elif name.endswith('.gate.pos.table'):
            old = (math.isqrt(value.shape[0]) + 1) // 2  # (2w - 1)^2 offsets
            out[name] = resize_rel_pos_bias_table(value, (new, new), tuple(target.shape), (old, old))
        elif name.endswith('.gate.proj.weight'):
            old = math.isqrt(value.shape[0])
            raise ValueError(
                f'{name}: an SGU gate\'s {old * old}x{old * old} token-mixing matrix belongs to {old}x{old} windows '
                f'and has no relative form to resample to the model\'s {new}x{new}; build the model with the '
                f'checkpoint\'s windows (win_size), with which any image size works.')
        else:
            continue
        changed.setdefault(stage, (old, new, set()))[2].add(name.rsplit('.', 1)[-1])
    if changed:
        _log_resampled(changed, any(name.endswith('.gate.pos.centers') for name in state_dict))
    return out


def _log_resampled(changed: dict, has_gqpe: bool):
    """One line naming, stage by stage, the windows and the weights resampled between them."""
    what = {'table': 'LRPE tables', 'token_bias': 'token biases'}
    stages = '; '.join(f'stage {stage} {old}x{old} -> {new}x{new}: {" and ".join(what[k] for k in sorted(kinds))}'
                       for stage, (old, new, kinds) in sorted(changed.items()))
    gqpe = ' GQPE centres and spreads carried over unchanged.' if has_gqpe else ''
    _logger.info(f'Resampled to the model\'s windows: {stages}.{gqpe}')


def _create_posmlp(variant: str, pretrained: bool = False, **kwargs) -> PosMLP:
    weights_file = (kwargs.get('pretrained_cfg_overlay') or {}).get('file')
    if pretrained and weights_file and not os.path.isfile(weights_file):
        # timm only logs the path and raises an empty FileNotFoundError.
        raise FileNotFoundError(errno.ENOENT, 'the checkpoint that pretrained_cfg_overlay names does not exist '
                                              '(or is not a file); check the path', weights_file)
    num_stages = len(kwargs.get('depths', (1, 1, 1, 1)))
    out_indices = kwargs.pop('out_indices', tuple(range(num_stages)))
    return build_placed(
        build_model_with_cfg, PosMLP, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(**kwargs):
    return dict(
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9, interpolation='bicubic',
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv='stem.conv1', classifier='head',
        paper_ids='arXiv:2207.07284', paper_name='Parameterization of Cross-Token Relations with Relative '
        'Positional Encoding for Vision MLP', origin_url='https://github.com/Zhicaiwww/PosMLP',
        license='mit', **kwargs,
    )


default_cfgs = generate_default_cfgs({
    'posmlp_t.in1k': _cfg(),
    'posmlp_s.in1k': _cfg(),
    'posmlp_b.in1k': _cfg(),
    'posmlp_t_lrpe': _cfg(),
    'posmlp_s_lrpe': _cfg(),
    'posmlp_b_lrpe': _cfg(),
    'posmlp_t_sgu': _cfg(),
    'posmlp_s_sgu': _cfg(),
    'posmlp_b_sgu': _cfg(),
})

# The stage widths of each registered size; everything else is shared.
VARIANT_EMBED_DIMS = dict(t=(96, 192, 384, 768), s=(128, 256, 512, 1024), b=(192, 384, 768, 1536))


def _posmlp(size: str, variant_gate: str, pretrained: bool, **kwargs) -> PosMLP:
    suffix = '' if variant_gate == 'gqpe' else f'_{variant_gate}'
    model_args = dict(depths=(2, 2, 18, 2), gate=variant_gate, embed_dims=VARIANT_EMBED_DIMS[size])
    return _create_posmlp(f'posmlp_{size}{suffix}', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def posmlp_t(pretrained: bool = False, **kwargs) -> PosMLP:
    """PosMLP-T (GQPE), 20.9M parameters, 82.1 top-1 in the paper."""
    return _posmlp('t', 'gqpe', pretrained, **kwargs)


@register_model
def posmlp_s(pretrained: bool = False, **kwargs) -> PosMLP:
    """PosMLP-S (GQPE), 36.8M parameters, 83.0 top-1 in the paper."""
    return _posmlp('s', 'gqpe', pretrained, **kwargs)


@register_model
def posmlp_b(pretrained: bool = False, **kwargs) -> PosMLP:
    """PosMLP-B (GQPE), 82.0M parameters, 83.6 top-1 in the paper."""
    return _posmlp('b', 'gqpe', pretrained, **kwargs)


@register_model
def posmlp_t_lrpe(pretrained: bool = False, **kwargs) -> PosMLP:
    """PosMLP-T with learnable relative positional encoding."""
    return _posmlp('t', 'lrpe', pretrained, **kwargs)


@register_model
def posmlp_s_lrpe(pretrained: bool = False, **kwargs) -> PosMLP:
    """PosMLP-S with learnable relative positional encoding."""
    return _posmlp('s', 'lrpe', pretrained, **kwargs)


@register_model
def posmlp_b_lrpe(pretrained: bool = False, **kwargs) -> PosMLP:
    """PosMLP-B with learnable relative positional encoding."""
    return _posmlp('b', 'lrpe', pretrained, **kwargs)


@register_model
def posmlp_t_sgu(pretrained: bool = False, **kwargs) -> PosMLP:
    """PosMLP-T's architecture with gMLP's spatial gating unit in each window (ablation baseline)."""
    return _posmlp('t', 'sgu', pretrained, **kwargs)


@register_model
def posmlp_s_sgu(pretrained: bool = False, **kwargs) -> PosMLP:
    """PosMLP-S's architecture with gMLP's spatial gating unit in each window (ablation baseline)."""
    return _posmlp('s', 'sgu', pretrained, **kwargs)


@register_model
def posmlp_b_sgu(pretrained: bool = False, **kwargs) -> PosMLP:
    """PosMLP-B's architecture with gMLP's spatial gating unit in each window (ablation baseline)."""
    return _posmlp('b', 'sgu', pretrained, **kwargs)
