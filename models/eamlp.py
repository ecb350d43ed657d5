"""EAMLP: a tokens-to-token vision MLP whose token mixing is external attention.

Paper: "Beyond Self-attention: External Attention using Two Linear Layers for Visual Tasks" (Guo et al.,
arXiv 2105.02358). Written for this project from the behaviour of the authors' model (github.com/MenghaoGuo/
EANet, folder EAMLP: a fork of T2T-ViT, Clear BSD license, in which the attention is replaced by external
attention; `T2t_vit_14` / `T2t_vit_19` there). It computes the same function under the authors'
parameter names, so their checkpoints load as they are.

External attention mixes the N tokens through a small learned memory of M units instead of the tokens
themselves: a = softmax over the tokens of (x W0^T), each token's row renormalised over the memory units,
then out = a W1^T. Its cost is linear in N.

The token modules of the stem tie their two memories: in the authors' code `linear_1.weight` is made as
the transpose view of `linear_0.weight`. Here it is derived from `linear_0.weight` on every use (and
written to state dicts, as the authors' checkpoints hold both), so training keeps them transposes of each
other. But the authors' GPU runs trained the two apart (moving their model to the GPU copies the two
parameters apart), so their checkpoints can hold two that differ. `tied_token_weights=False` gives linear_1
its own weight, as there; by default (None) a token module is tied until it is given weights whose two
differ, when it unties itself and says so. The project's checkpoint loader picks the form the weights show.
"""
import logging
import math
import re
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
# timm exports no public name for it; its own models import it from here, as this one does.
from timm.models._features import feature_take_indices

from utils.weights_choice import training_weights

from .placement import build_placed

_logger = logging.getLogger(__name__)

__all__ = ['EAMLP', 'TokenExternalAttention', 'ExternalAttention', 'checkpoint_filter_fn', 'read_architecture',
           'sinusoid_table']

# The tokens-to-token stem's soft splits: (kernel, stride, padding) of its three unfolds.
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))


def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """(1, num_positions, dim): sin(p / 10000^(2i / dim)) in channel 2i, cos of the same in channel 2i + 1."""
    positions = torch.arange(num_positions, dtype=torch.float64)[:, None]
    channels = torch.arange(dim)
    angles = positions / 10000 ** ((channels // 2 * 2).double() / dim)
    return torch.where(channels % 2 == 0, angles.sin(), angles.cos()).float()[None]


def token_grid_sides(img_side: int) -> List[int]:
    """The side of the token map after each soft split of an img_side x img_side input (224: 56, 28, 14)."""
    sides = []
    for kernel, stride, padding in SOFT_SPLITS:
        img_side = (img_side + 2 * padding - kernel) // stride + 1
        sides.append(img_side)
    return sides


class TiedReadout(nn.Module):
    """linear_1 of a token module with tied memories: a bias only, the weight being linear_0's transposed."""

    def __init__(self, out_features: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(out_features))


class TokenExternalAttention(nn.Module):
    """External attention of the stem's token modules, with a memory of `memory` units:
    q = q_linear(x); out = q + proj(normalised_softmax(linear_0(q)) W1^T + b1), W1 = linear_0.weight^T when
    tied (the authors' `Token_performer` attention).

    tied: True ties W1 to linear_0.weight, False gives linear_1 a weight of its own; None ties them until the
    module is given weights whose two differ (see `untie`).
    """

    def __init__(self, dim: int, in_dim: int, memory: int = 128, attn_drop: float = 0.1, proj_drop: float = 0.1,
                 tied: Optional[bool] = None):
        super().__init__()
        self.tied = tied is not False
        self.untie_on_load = tied is None
        self.q_linear = nn.Linear(dim, in_dim)
        self.linear_0 = nn.Linear(in_dim, memory, bias=False)
        self.linear_1 = TiedReadout(in_dim) if self.tied else nn.Linear(memory, in_dim)
        self.register_state_dict_post_hook(_store_tied_weight)
        self.register_load_state_dict_pre_hook(_take_tied_weight)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(in_dim, in_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def readout_weight(self) -> torch.Tensor:
        """linear_1's weight, (in_dim, memory)."""
        return self.linear_0.weight.t() if self.tied else self.linear_1.weight

    def untie(self):
        """Give linear_1 a weight of its own, a copy of linear_0's transposed; its bias stays."""
        weight = self.linear_0.weight
        readout = nn.Linear(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            readout.weight.copy_(weight.t())
        readout.bias = self.linear_1.bias
        self.linear_1, self.tied = readout, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_linear(x)
        attn = _normalised_attention(self.linear_0(q))
        x = F.linear(self.attn_drop(attn), self.readout_weight(), self.linear_1.bias)
        return q + self.proj_drop(self.proj(x))


def _normalised_attention(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the tokens (dim -2), then each token's weights divided by their sum over the memory."""
    attn = scores.softmax(dim=-2)
    return attn / (1e-9 + attn.sum(dim=-1, keepdim=True))


def _store_tied_weight(module: TokenExternalAttention, state_dict: dict, prefix: str, local_metadata) -> None:
    """State dicts hold linear_1.weight as the authors' do: a copy, so that in-place updates of state dict
    entries (timm's EMA lerps every one) cannot reach linear_0.weight twice."""
    if module.tied:
        state_dict[prefix + 'linear_1.weight'] = module.linear_0.weight.detach().t().clone()


def _take_tied_weight(module: TokenExternalAttention, state_dict: dict, prefix: str, local_metadata, strict,
                      missing_keys, unexpected_keys, error_msgs) -> None:
    """A tied module takes a stored linear_1.weight that is linear_0.weight transposed. One that is not, it
    refuses, or unties itself to take it if it was built to (tied=None)."""
    key = prefix + 'linear_1.weight'
    if not module.tied or key not in state_dict:
        return
    readout, memory = state_dict[key], state_dict.get(prefix + 'linear_0.weight')
    if memory is None or torch.equal(readout, memory.t()):
        del state_dict[key]  # a tied linear_1 has no weight to load it into
        return
    if module.untie_on_load:
        module.untie()  # linear_1 is loaded after this hook, and takes the stored weight
        _logger.warning(f'{key} is not the transpose of {prefix}linear_0.weight (the authors\' GPU runs trained the '
                        f'two apart): this token module keeps its own linear_1.weight from now on, untied.')
        return
    del state_dict[key]
    error_msgs.append(
        f'{key} is not the transpose of {prefix}linear_0.weight, so these weights do not fit a model whose token '
        f'modules tie them: build it with tied_token_weights=False or None (the authors\' GPU runs trained the '
        f'two apart), or load it with models.create_model_from_checkpoint, which does so itself.')


class TokenModule(nn.Module):
    """A token module of the stem: x = attn(LN(x)) (no skip around it: its own skip is q), x + Mlp(LN(x))."""

    def __init__(self, dim: int, in_dim: int, tied: Optional[bool] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenExternalAttention(dim, in_dim, tied=tied)
        self.norm2 = nn.LayerNorm(in_dim)
        self.mlp = Mlp(in_dim, in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokensToToken(nn.Module):
    """Tokens-to-token stem: unfold (soft split) the image, a token module, fold the tokens back into a map,
    unfold again, ..., and project the last split's patches to the embedding width."""

    def __init__(self, img_side: int, in_chans: int, embed_dim: int, token_dim: int, tied: Optional[bool] = None):
        super().__init__()
        self.sides = token_grid_sides(img_side)
        (kernel0, _, _), (kernel1, _, _), (kernel2, _, _) = SOFT_SPLITS
        self.attention1 = TokenModule(in_chans * kernel0 ** 2, token_dim, tied)
        self.attention2 = TokenModule(token_dim * kernel1 ** 2, token_dim, tied)
        self.project = nn.Linear(token_dim * kernel2 ** 2, embed_dim)

    @staticmethod
    def _soft_split(x: torch.Tensor, split: Tuple[int, int, int]) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, C * k * k) overlapping patches."""
        kernel, stride, padding = split
        return F.unfold(x, kernel, stride=stride, padding=padding).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention1(self._soft_split(x, SOFT_SPLITS[0]))
        x = x.transpose(1, 2).unflatten(2, (self.sides[0], self.sides[0]))
        x = self.attention2(self._soft_split(x, SOFT_SPLITS[1]))
        x = x.transpose(1, 2).unflatten(2, (self.sides[1], self.sides[1]))
        return self.project(self._soft_split(x, SOFT_SPLITS[2]))


class ExternalAttention(nn.Module):
    """Multi-head external attention of the blocks: widen C -> 4C (`trans_dims`), split into 4 * num_heads
    heads, each read through its own 64-unit memory (`linear_0`, `linear_1`, with biases), join, C <- 4C."""

    def __init__(self, dim: int, num_heads: int, expansion: int = 4, memory: int = 64, attn_drop: float = 0.,
                 proj_drop: float = 0.):
        super().__init__()
        self.num_heads = num_heads * expansion
        head_dim = dim * expansion // self.num_heads
        self.trans_dims = nn.Linear(dim, dim * expansion)
        self.linear_0 = nn.Linear(head_dim, memory)
        self.linear_1 = nn.Linear(memory, head_dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim * expansion, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        heads = self.trans_dims(x).view(B, N, self.num_heads, -1).transpose(1, 2)  # (B, heads, N, head_dim)
        attn = self.attn_drop(_normalised_attention(self.linear_0(heads)))
        x = self.linear_1(attn).transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """x + DropPath(ExternalAttention(LN(x))), then x + DropPath(Mlp(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 3., drop: float = 0., attn_drop: float = 0.,
                 drop_path: float = 0.):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ExternalAttention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class EAMLP(nn.Module):
    """EAMLP: tokens-to-token stem, class token, fixed sinusoidal positions, external-attention blocks,
    LayerNorm, and the class token to the head.

    Args:
        img_size: the input side (square); the position table has one entry per token of that size.
        embed_dim, depth, num_heads, mlp_ratio: width, blocks, heads (each block has 4 * num_heads memory
            heads of embed_dim / num_heads channels) and the channel MLP's hidden width in multiples of C.
        token_dim: width of the stem's token modules.
        tied_token_weights: True derives the token modules' linear_1.weight from linear_0.weight (see the
            module docstring), False gives it its own parameter; None (the default) derives it until the model
            is given weights whose two differ, when those modules untie, with a warning.
        drop_rate: dropout after the position embedding and in every block's projection and MLP.
        attn_drop_rate: dropout on the blocks' attention maps (the stem's token modules always use 0.1 on
            theirs and on their projection, as in the authors' code).
        drop_path_rate: stochastic depth of the last block, rising linearly from 0.
    """

    def __init__(
            self,
            img_size: int = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 384,
            depth: int = 14,
            num_heads: int = 6,
            mlp_ratio: float = 3.,
            token_dim: int = 64,
            tied_token_weights: Optional[bool] = None,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        if not isinstance(img_size, int):
            if len(set(img_size)) != 1:
                raise ValueError(f'EAMLP: img_size {tuple(img_size)}; the tokens-to-token stem takes square inputs '
                                 f'only.')
            img_size = img_size[0]
        _check_pooling(global_pool, num_classes)
        self.img_size = img_size
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grad_checkpointing = False

        self.tokens_to_token = TokensToToken(img_size, in_chans, embed_dim, token_dim, tied_token_weights)
        self.grid_side = self.tokens_to_token.sides[-1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed, not learned; stored in checkpoints as in the authors' (where it is a frozen parameter).
        self.register_buffer('pos_embed', sinusoid_table(self.grid_side ** 2 + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        drop_path = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, drop_rate, attn_drop_rate, drop_path[i]) for i in range(depth)])
        reduction = math.prod(stride for _, stride, _ in SOFT_SPLITS)
        self.feature_info = [dict(num_chs=embed_dim, reduction=reduction, module=f'blocks.{i}') for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def no_weight_decay(self):
        """The class token, as in the authors' training (the position table is no parameter)."""
        return {'cls_token'}

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^cls_token|^pos_embed|^tokens_to_token',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        _check_pooling(self.global_pool if global_pool is None else global_pool, num_classes)
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _check_input(self, x: torch.Tensor):
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f'EAMLP takes only {self.img_size}x{self.img_size} input (its position table has one entry per '
                f'token of that size), not {x.shape[-2]}x{x.shape[-1]}; resize the input, or build the model with '
                f'img_size={x.shape[-2]} if the input is square.')

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.tokens_to_token(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Block outputs without the class token, as (B, C, H/16, W/16) maps (or NHWC); `norm` applies the
        final norm to each, as timm's vision transformers do."""
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"EAMLP.forward_intermediates: output_fmt={output_fmt!r}; use 'NCHW' or 'NHWC'.")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self._embed(x)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = block(x)
            if i in take_indices:
                y = (self.norm(x) if norm else x)[:, 1:].unflatten(1, (self.grid_side, self.grid_side))
                intermediates.append(y if output_fmt == 'NHWC' else y.permute(0, 3, 1, 2))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks after the last one `indices` asks for (and the norm/head if asked)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> normalised tokens (B, 1 + H/16 * W/16, C), the class token first."""
        x = self._embed(x)
        if self.grad_checkpointing:
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'token':
            x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_pooling(global_pool: str, num_classes: int):
    if global_pool not in ('token', ''):
        raise ValueError(f"EAMLP: global_pool={global_pool!r}; use 'token' (the class token) or '' (all tokens).")
    if global_pool == '' and num_classes > 0:
        raise ValueError(f"EAMLP: global_pool='' keeps every token, which a {num_classes}-class head cannot "
                         f"classify; use global_pool='token', or num_classes=0 for features.")


def checkpoint_filter_fn(state_dict: dict, model: Optional[nn.Module] = None) -> dict:
    """The authors' checkpoints already use this module's names: pick the weights of a whole training
    checkpoint (EMA when present) and drop DDP's `module.` prefix."""
    return training_weights(state_dict, model)


def _token_weights_tied(state_dict: Dict[str, torch.Tensor]) -> bool:
    """Whether every token module's stored linear_1.weight is its linear_0.weight transposed."""
    prefixes = [k[:-len('linear_0.weight')] for k in state_dict
                if k.startswith('tokens_to_token.') and k.endswith('attn.linear_0.weight')]
    return all(prefix + 'linear_1.weight' not in state_dict
               or torch.equal(state_dict[prefix + 'linear_1.weight'], state_dict[prefix + 'linear_0.weight'].t())
               for prefix in prefixes)


def read_architecture(state_dict: Dict[str, torch.Tensor]) -> Optional[Tuple[str, Dict[str, Any]]]:
    """(registered name, model arguments) of the EAMLP whose weights these are, None when they are no EAMLP
    (or another stem of the authors' T2T-ViT code, which this module does not build)."""
    state_dict = checkpoint_filter_fn(state_dict)
    needed = ('tokens_to_token.project.weight', 'tokens_to_token.attention1.attn.q_linear.weight',
              'tokens_to_token.attention1.norm1.weight', 'blocks.0.attn.trans_dims.weight')
    if not all(k in state_dict for k in needed):
        return None
    embed_dim = state_dict['tokens_to_token.project.weight'].shape[0]
    head_dim = state_dict['blocks.0.attn.linear_0.weight'].shape[1]
    hidden = state_dict['blocks.0.mlp.fc1.weight'].shape[0]
    kernel0 = SOFT_SPLITS[0][0]
    kwargs = dict(
        in_chans=state_dict['tokens_to_token.attention1.norm1.weight'].shape[0] // kernel0 ** 2,
        embed_dim=embed_dim,
        depth=len({int(m.group(1)) for k in state_dict if (m := re.match(r'blocks\.(\d+)\.', k))}),
        num_heads=embed_dim // head_dim,
        mlp_ratio=hidden / embed_dim,
        token_dim=state_dict['tokens_to_token.attention1.attn.q_linear.weight'].shape[0],
        tied_token_weights=_token_weights_tied(state_dict),
        num_classes=state_dict['head.weight'].shape[0] if 'head.weight' in state_dict else 0,
    )
    if 'pos_embed' in state_dict:
        # The stem reduces by 16: a grid of side s comes from a 16 s input.
        kwargs['img_size'] = 16 * math.isqrt(state_dict['pos_embed'].shape[1] - 1)
    architecture = {k: kwargs[k] for k in ('embed_dim', 'depth', 'num_heads')}
    name = next((n for n, v in VARIANTS.items() if {k: v[k] for k in architecture} == architecture), 'eamlp_14')
    return name, kwargs


def _create_eamlp(variant: str, pretrained: bool = False, **kwargs) -> EAMLP:
    out_indices = kwargs.pop('out_indices', min(3, kwargs['depth']))  # the last three blocks, as timm's ViTs
    return build_placed(
        build_model_with_cfg, EAMLP, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg():
    return dict(
        num_classes=1000, input_size=(3, 224, 224), pool_size=None, fixed_input_size=True, crop_pct=0.9,
        interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv=None,
        classifier='head', paper_ids='arXiv:2105.02358',
        paper_name='Beyond Self-attention: External Attention using Two Linear Layers for Visual Tasks',
        origin_url='https://github.com/MenghaoGuo/EANet', license='bsd-3-clause-clear',
    )


default_cfgs = generate_default_cfgs({
    'eamlp_14': _cfg(),
    'eamlp_19': _cfg(),
})

VARIANTS = dict(
    eamlp_14=dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.),
    eamlp_19=dict(embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.),
)


@register_model
def eamlp_14(pretrained: bool = False, **kwargs) -> EAMLP:
    """EAMLP-14 (the authors' T2t_vit_14 with external attention): 29.8M trainable parameters, 78.9 top-1 in
    ViP's table."""
    return _create_eamlp('eamlp_14', pretrained=pretrained, **{**VARIANTS['eamlp_14'], **kwargs})


@register_model
def eamlp_19(pretrained: bool = False, **kwargs) -> EAMLP:
    """EAMLP-19 (T2t_vit_19 with external attention): 54.5M trainable parameters, 79.4 top-1 in ViP's table."""
    return _create_eamlp('eamlp_19', pretrained=pretrained, **{**VARIANTS['eamlp_19'], **kwargs})
