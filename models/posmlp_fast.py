"""The channel-major form of a PosMLP block's MLP (`gate_impl='fast'`): fc1 -> act -> PoSGU -> fc2.

The reference form mixes tokens with a 5-D einsum on (B, nW, N, D) activations, which copies them
into a group-major layout and back in every block. Here fc1 writes its output as (channels, tokens),
with its rows taken in group-major order, so each group's rows are one contiguous (D / gamma * B * nW, N)
matrix: the whole mixing is one batched matrix multiply over views, with the token bias added
inside it (baddbmm), and fc2 reads the result in the same order. Only the small weight matrices
are reordered; no activation is copied.

The piece reads fc1's and fc2's weights and the gate's token bias, so forward and backward hooks on
fc1, fc2 and the gate do not fire in it; the activation and the gate's positional encoder are called
as modules (the activation on (channels, tokens) data). `gate_impl='reference'` runs the same
parameters module by module. It is plain differentiable ops, so autograd, torch.func, torch.compile
and export see it as they see the reference form.
"""
from typing import Optional

import torch
from torch import nn


def group_major(t: torch.Tensor, gamma: int, dim: int = 0, halves: int = 1) -> torch.Tensor:
    """Reorder the channels on `dim` group by group (channel k is in group k % gamma), in each of
    `halves` equal halves separately."""
    shape = t.shape
    return t.unflatten(dim, (halves, -1, gamma)).transpose(dim + 1, dim + 2).reshape(shape)


def mix_groups_channel_major(u: torch.Tensor, maps: torch.Tensor, bias: torch.Tensor, num_windows: int) -> torch.Tensor:
    """mix(u) + bias on channel-major u: (D, M), channels in `group_major` order, tokens M = (B, nW, N)
    flattened; maps (gamma, N, N) shared by all windows, or (nW, gamma, N, N) per window (padding)."""
    D, M = u.shape
    gamma, N = maps.shape[-3], maps.shape[-1]
    bias = bias.reshape(1, 1, N)
    if maps.dim() == 3:
        mixed = torch.baddbmm(bias, u.view(gamma, -1, N), maps.transpose(1, 2))
    else:  # per-window maps: windows join the batch
        rows = u.view(gamma, -1, num_windows, N).transpose(1, 2)
        mixed = (torch.matmul(rows, maps.transpose(0, 1).transpose(-1, -2)) + bias).transpose(1, 2)
    return mixed.reshape(D, M)


def channel_major_mlp(
        tokens: torch.Tensor,
        fc1: nn.Linear,
        act: nn.Module,
        gate: nn.Module,
        fc2: nn.Linear,
        invalid_tokens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """fc2(gate(act(fc1(tokens)))) for normalised tokens (B, nW, N, C) and a PoSGU gate."""
    B, nW, N, C = tokens.shape
    gamma = gate.gamma
    fc1_weight = group_major(fc1.weight, gamma, halves=2)
    fc1_bias = group_major(fc1.bias, gamma, halves=2)
    h = act(torch.addmm(fc1_bias[:, None], fc1_weight, tokens.reshape(-1, C).t()))
    u, v = h.chunk(2)
    maps = gate.pos(invalid_tokens).to(h.dtype)
    gated = mix_groups_channel_major(u, maps, gate.token_bias.to(h.dtype), nW) * v
    y = torch.addmm(fc2.bias, gated.t(), group_major(fc2.weight, gamma, dim=1).t())
    return y.view(B, nW, N, C)
