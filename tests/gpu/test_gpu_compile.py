"""GPU check, part `compile`: posmlp_t compiled with torch.compile (inductor, as train.py and validate.py
--torchcompile do) computes what the eager model computes, in float32 and under float16 autocast (the
recipe's AMP), for inference and for a training step's outputs and gradients.

Compiling posmlp_t takes a minute or more per case, so the cases are few; tolerances are
check_setup.TOLERANCES. The smoke run (on the CPU) compiles with aot_eager, which traces the same
graphs without generating code.
"""
import copy

import project  # noqa: F401  (first: it runs the hub client offline before timm loads it)

import pytest
import timm
import torch

from check_setup import (
    AMP_DTYPES, TOLERANCES, assert_within, check_device, exact_float32, gradients, gradient_error, input_batch,
    model_kwargs, relative_error, smoke,
)

PART = 'compile'
# In order of importance, should the part run out of time: inference, then the recipe's training step.
CASES = (('eval', 'float32'), ('train', 'float16'), ('eval', 'float16'), ('train', 'float32'))


def run(model: torch.nn.Module, x: torch.Tensor, mode: str, dtype: str):
    """The output (and in training, the gradients of a loss on it) under autocast to `dtype`."""
    amp = dtype in AMP_DTYPES
    with torch.set_grad_enabled(mode == 'train'), torch.autocast(x.device.type, AMP_DTYPES.get(dtype), enabled=amp):
        out = model(x)
    if mode == 'eval':
        return out, {}
    out.float().square().sum().backward()
    return out.detach(), gradients(model)


@pytest.mark.parametrize('mode,dtype', CASES, ids=[f'{mode}-{dtype}' for mode, dtype in CASES])
def test_compiled_model_matches_eager(mode, dtype):
    device = check_device()
    exact_float32()
    torch._dynamo.reset()  # each case compiles afresh, within dynamo's recompilation limit
    torch.manual_seed(0)
    eager = timm.create_model('posmlp_t', num_classes=10, **model_kwargs(device)).to(device).train(mode == 'train')
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=False,
                             backend='aot_eager' if smoke(device) else 'inductor')
    x = input_batch(device)
    out_eager, grads_eager = run(eager, x, mode, dtype)
    out_compiled, _ = run(compiled, x, mode, dtype)
    tol_out, tol_grad = TOLERANCES[dtype]
    case = f'posmlp_t {mode} {dtype}{"-autocast" if dtype in AMP_DTYPES else ""}'
    assert_within(PART, case, 'output compiled vs eager', relative_error(out_compiled, out_eager), tol_out)
    if mode == 'train':
        assert_within(PART, case, 'gradients compiled vs eager', gradient_error(gradients(compiled_model), grads_eager),
                      tol_grad)
