"""What the GPU check's pytest parts share: where they run, the model size, the tolerances, the record.

`GPU_CHECK_DEVICE` (set by gpu_check.py) says where: `cuda` runs the full-size models at 224 px and
fails if CUDA is missing; `cpu` (gpu_check.py --cpu-smoke) runs a tiny model on the CPU, to check the
check itself. Unset, as in the normal suite, the tests use CUDA when there is one and skip otherwise.

Tolerances are on relative errors, |a - b| / |b| over a whole tensor (all parameters' gradients
concatenated, for gradients), between the fast and the reference gate, the compiled and the eager
model, or the fused and the unfused one. Measured on the CPU with posmlp_t (batch 2, perturbed
weights) the two gate forms differ by 4e-7 (outputs and gradients) in float32, by 8e-4 (outputs) and
4e-3 (gradients) under float16 autocast, and by 7e-3 and 9e-3 under bfloat16 autocast or with the model
cast to bfloat16; each tolerance leaves 7-50x room above that. Float32 comparisons turn TF32 off.
"""
import json
import os
from typing import Dict, Optional

import pytest
import torch

import project  # noqa: F401  (the project's models, registered with timm)
from conftest import CUDA_SKIP_PREFIX, TINY_KWARGS

DEVICE_VARIABLE = 'GPU_CHECK_DEVICE'
RECORD_VARIABLE = 'GPU_CHECK_RECORD'  # a JSON-lines file that collects the measured errors

# Relative error allowed for (outputs, gradients) per precision; see the module docstring.
TOLERANCES = {
    'float32': (2e-5, 2e-5),
    'float16': (1e-2, 3e-2),
    'bfloat16': (5e-2, 8e-2),
}
AMP_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}

# The smoke run's model: windows of 2x2 or more at 64 px, so every positional parameter matters.
SMOKE_KWARGS = dict(TINY_KWARGS, img_size=64, win_size=(4, 4, 2, 2))


def check_device() -> torch.device:
    """The device the parts run on; skips (the only allowed reason: needs CUDA) when there is none."""
    wanted = os.environ.get(DEVICE_VARIABLE)
    if wanted == 'cpu':
        return torch.device('cpu')
    if torch.cuda.is_available():
        return torch.device('cuda')
    if wanted:
        pytest.fail(f'{DEVICE_VARIABLE}={wanted}, but CUDA is not available in this process.')
    pytest.skip(f'{CUDA_SKIP_PREFIX}: the GPU check runs on a GPU (python3 tests/gpu/gpu_check.py).')


def smoke(device: torch.device) -> bool:
    return device.type == 'cpu'


def model_kwargs(device: torch.device) -> dict:
    return dict(SMOKE_KWARGS) if smoke(device) else {}


def input_batch(device: torch.device, batch: int = 8, seed: int = 0) -> torch.Tensor:
    side = SMOKE_KWARGS['img_size'] if smoke(device) else 224
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2 if smoke(device) else batch, 3, side, side, generator=generator).to(device)


def exact_float32():
    """Float32 matrix multiplies and convolutions without TF32, so float32 comparisons are float32's."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def gradients(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {name: p.grad.detach().double().clone() for name, p in model.named_parameters() if p.grad is not None}


def gradient_error(grads: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> float:
    """Relative error of all gradients together; both must cover the same parameters."""
    assert grads.keys() == expected.keys(), sorted(set(grads) ^ set(expected))
    return relative_error(torch.cat([g.flatten() for g in grads.values()]),
                          torch.cat([expected[name].flatten() for name in grads]))


def record(part: str, case: str, metric: str, value: float, tolerance: Optional[float] = None, **extra):
    """Append one measured number to the check's record (when gpu_check.py asks for one)."""
    path = os.environ.get(RECORD_VARIABLE)
    if path:
        row = dict(part=part, case=case, metric=metric, value=value, tolerance=tolerance, **extra)
        with open(path, 'a') as file:
            file.write(json.dumps(row) + '\n')


def assert_within(part: str, case: str, metric: str, value: float, tolerance: float):
    record(part, case, metric, value, tolerance)
    assert value <= tolerance, f'{case}: {metric} {value:.3e} > tolerance {tolerance:.1e}'
