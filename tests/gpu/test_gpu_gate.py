"""GPU check, part `gate`: the fast PoSGU form against the reference form on the GPU, in every precision.

posmlp_t (GQPE) and posmlp_t_lrpe, built with gate_impl='fast' and 'reference' and holding the same
(perturbed) weights: outputs and gradients in training, the evaluation paths without autograd, the
maps after a parameter edit, and the fused model. Tolerances: check_setup.TOLERANCES.
"""
import contextlib
import copy

import project  # noqa: F401  (first: it runs the hub client offline before timm loads it)

import pytest
import timm
import torch
from timm.utils import reparameterize_model

from check_setup import (
    AMP_DTYPES, TOLERANCES, assert_within, check_device, exact_float32, gradients, gradient_error, input_batch,
    model_kwargs, record, relative_error,
)

PART = 'gate'
MODELS = ('posmlp_t', 'posmlp_t_lrpe')
# NAME-autocast runs a float32 model under torch.autocast, as training with --amp does; NAME alone casts the
# model and its input to that type.
PRECISIONS = ('float32', 'float16-autocast', 'bfloat16-autocast', 'float16', 'bfloat16')
DTYPES = dict(AMP_DTYPES, float32=torch.float32, float64=torch.float64)


def dtype_name(precision: str) -> str:
    return precision.split('-')[0]


def forward(model: torch.nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    """The model's output in `precision`; a cast precision casts the model in place."""
    dtype = DTYPES[dtype_name(precision)]
    if precision.endswith('-autocast'):
        with torch.autocast(x.device.type, dtype=dtype):
            return model(x)
    return model.to(dtype)(x.to(dtype))


def perturbed_pair(name: str, device: torch.device):
    """The fast and the reference form with the same weights, moved off their initial values so that
    biases, token biases and positional parameters all matter."""
    torch.manual_seed(0)
    kwargs = dict(model_kwargs(device), num_classes=10)
    fast = timm.create_model(name, gate_impl='fast', **kwargs)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param_name, p in fast.named_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * (0.1 if '.gate.' in param_name else 0.02))
    reference = timm.create_model(name, gate_impl='reference', **kwargs)
    reference.load_state_dict(fast.state_dict())
    return fast.to(device), reference.to(device)


def evaluation_setup(name: str):
    """Both forms in eval mode with the same perturbed weights, and an input batch, on the checked device."""
    device = check_device()
    exact_float32()
    fast, reference = perturbed_pair(name, device)
    return fast.eval(), reference.eval(), input_batch(device)


def output_and_gradients(model: torch.nn.Module, x: torch.Tensor, precision: str):
    model.train()
    model.zero_grad(set_to_none=True)
    out = forward(model, x, precision)
    out.float().square().sum().backward()
    return out.detach(), gradients(model)


def parameter_errors(grads: dict, truth: dict) -> dict:
    """Each parameter's gradient error against float64, relative to its own size but floored at 1e-3 of
    all gradients together: a bias feeding BatchNorm has a true gradient of zero, so its computed one is
    rounding noise that no relative comparison can judge."""
    floor = 1e-3 * torch.stack([g.norm() for g in truth.values()]).norm()
    return {name: ((grads[name] - g).norm() / g.norm().clamp_min(floor)).item() for name, g in truth.items()}


@pytest.mark.parametrize('precision', PRECISIONS)
@pytest.mark.parametrize('name', MODELS)
def test_training_outputs_and_gradients_match(name, precision):
    device = check_device()
    exact_float32()
    fast, reference = perturbed_pair(name, device)
    x = input_batch(device)
    _, truth = output_and_gradients(copy.deepcopy(reference).double(), x.double(), 'float64')
    out_fast, grads_fast = output_and_gradients(fast, x, precision)
    out_ref, grads_ref = output_and_gradients(reference, x, precision)
    tol_out, tol_grad = TOLERANCES[dtype_name(precision)]
    case = f'{name} {precision} train'
    assert_within(PART, case, 'output fast vs reference', relative_error(out_fast, out_ref), tol_out)
    assert_within(PART, case, 'gradients fast vs reference', gradient_error(grads_fast, grads_ref), tol_grad)
    # Parameter by parameter, the fast form is about as close to float64 as the reference form is.
    fast_errors, ref_errors = parameter_errors(grads_fast, truth), parameter_errors(grads_ref, truth)
    excess = {n: fast_errors[n] - 2 * ref_errors[n] for n in truth}
    worst = max(excess, key=excess.get)
    assert_within(PART, case, 'per-parameter gradient error vs float64 beyond 2x the reference form\'s',
                  excess[worst], tol_grad)


@pytest.mark.parametrize('precision', PRECISIONS)
@pytest.mark.parametrize('name', MODELS)
def test_evaluation_paths_match(name, precision):
    """Evaluation without autograd, in inference mode, with autograd, and in
    channels-last layout all give the reference form's output, and leave the input alone."""
    fast, reference, x = evaluation_setup(name)
    kept = x.clone()
    with torch.no_grad():
        expected = forward(reference, x, precision)
    tol_out = TOLERANCES[dtype_name(precision)][0]
    case = f'{name} {precision} eval'
    for path, mode in (('no_grad', torch.no_grad), ('inference_mode', torch.inference_mode),
                       ('autograd', contextlib.nullcontext)):
        with mode():
            out = forward(fast, x, precision)
        assert_within(PART, case, f'output fast ({path}) vs reference', relative_error(out, expected), tol_out)
    channels_last = copy.deepcopy(fast).to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = forward(channels_last, x.contiguous(memory_format=torch.channels_last), precision)
    assert_within(PART, case, 'output fast (channels_last) vs reference', relative_error(out, expected), tol_out)
    assert torch.equal(x, kept), 'the evaluation changed its input'


@pytest.mark.parametrize('name', MODELS)
def test_cached_maps_follow_parameter_changes(name):
    """Repeated inference gives the same output; an in-place edit of the positional parameters (as an
    optimizer step makes) and a cast to another type are seen by the next inference: no stale maps."""
    fast, reference, x = evaluation_setup(name)
    tol32 = TOLERANCES['float32'][0]
    case = f'{name} cached maps'
    with torch.no_grad():
        first = fast(x)
        assert_within(PART, case, 'second inference vs first', relative_error(fast(x), first), tol32)
        positional = [p for param_name, p in fast.named_parameters() if '.gate.' in param_name]
        assert positional, 'no positional parameters found (names containing ".gate.")'
        generator = torch.Generator().manual_seed(2)
        for p in positional:
            p.add_(torch.randn(p.shape, generator=generator).to(x.device) * 0.5)
        reference.load_state_dict(fast.state_dict())
        edited = fast(x)
        assert_within(PART, case, 'after an in-place edit, fast vs reference', relative_error(edited, reference(x)),
                      tol32)
        change = relative_error(edited, first)
        record(PART, case, 'output change made by the edit', change)
        assert change > 10 * tol32, 'editing the positional parameters did not change the output: stale maps'
        fast.to(torch.bfloat16)
        reference.to(torch.bfloat16)
        x = x.to(torch.bfloat16)
        assert_within(PART, case, 'after a cast to bfloat16, fast vs reference', relative_error(fast(x), reference(x)),
                      TOLERANCES['bfloat16'][0])


@pytest.mark.parametrize('precision', PRECISIONS[:3])
@pytest.mark.parametrize('name', MODELS)
def test_fused_model_matches_unfused(name, precision):
    """timm's reparameterize_model (as inference.py and onnx_export.py --reparam use it), and the model's own
    fuse() where it has one, give the unfused model's output."""
    model, _, x = evaluation_setup(name)
    with torch.no_grad():
        expected = forward(model, x, precision)
    fused = {'reparameterize_model': reparameterize_model(model)}
    if callable(getattr(model, 'fuse', None)):
        own = copy.deepcopy(model)
        result = own.fuse()
        fused['model.fuse()'] = result if isinstance(result, torch.nn.Module) else own
    case = f'{name} {precision} fused'
    record(PART, case, 'model has fuse()', float('model.fuse()' in fused))
    for how, fused_model in fused.items():
        with torch.no_grad():
            out = forward(fused_model.eval(), x, precision)
        assert_within(PART, case, f'output {how} vs unfused', relative_error(out, expected),
                      TOLERANCES[dtype_name(precision)][0])
