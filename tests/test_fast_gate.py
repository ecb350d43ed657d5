"""The channel-major form (gate_impl='fast') and the fused inference form against the reference form.

Contract: the fast form computes the reference form's function and gradients from the same state dict;
`fuse()` / timm's `reparameterize_model` give the same outputs; an unfused model of either form works
under hooks, profilers, FLOP counters, torch.func, torch.compile, torch.jit.trace and torch.export.
"""
import copy

import pytest
import timm
import torch
from timm.models._manipulate import reinit_non_persistent_buffers
from torch.utils.flop_counter import FlopCounterMode

import models  # noqa: F401  (registers the models)
from models.posmlp import FrozenMaps, PoSGU
from conftest import TINY_KWARGS

# 64 px, windows of 2x2 or more: every map has something to mix, so every parameter matters.
KWARGS = dict(TINY_KWARGS, img_size=64, win_size=(4, 4, 2, 2), num_classes=5)
VARIANTS = [dict(gate='gqpe'), dict(gate='gqpe', generalized=False), dict(gate='lrpe')]


def perturbed_pair(**kwargs):
    """A fast and a reference model holding the same weights, moved away from their initial values."""
    torch.manual_seed(0)
    fast = timm.create_model('posmlp_t', gate_impl='fast', **dict(KWARGS, **kwargs))
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, buffer in fast.named_buffers():  # BatchNorm statistics away from (0, 1), for the folding
            if name.endswith(('running_mean', 'running_var')):
                buffer.copy_(torch.rand_like(buffer) + 0.5)
    reference = timm.create_model('posmlp_t', gate_impl='reference', **dict(KWARGS, **kwargs))
    reference.load_state_dict(fast.state_dict())
    return fast, reference


def relative_error(a, b, floor):
    """|a - b| / |b|, with |b| floored: a conv bias feeding BatchNorm in training has a true gradient of
    zero, so its computed gradient is rounding noise that no relative comparison can judge."""
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def assert_same_gradients(model, expected_model, tolerance=1e-4, floor_fraction=1e-2):
    """Per parameter, relative to its gradient or to `floor_fraction` of all gradients' norm if larger. The
    floor keeps a gradient that is only rounding noise (see `relative_error`) to tolerance x floor_fraction
    = 1e-6 of the whole gradient's norm, about 8 float32 epsilons: two summation orders differ by that much."""
    expected = {n: p.grad for n, p in expected_model.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    floor = floor_fraction * torch.stack([g.double().norm() for g in expected.values()]).norm()
    for name, grad in got.items():
        assert grad.dtype == expected[name].dtype, name
        assert relative_error(grad.double(), expected[name].double(), floor) < tolerance, name


@pytest.mark.parametrize('variant', VARIANTS, ids=lambda v: '-'.join(map(str, v.values())))
@pytest.mark.parametrize('training', [False, True])
@pytest.mark.parametrize('side', [64, 72])  # 72 does not divide into the windows: padded path
def test_fast_and_reference_agree(variant, training, side):
    fast, reference = perturbed_pair(**variant)
    fast.train(training)
    reference.train(training)
    x = torch.randn(3, 3, side, side)
    out_fast, out_ref = fast(x), reference(x)
    assert (out_fast - out_ref).abs().max().item() <= 1e-4
    out_fast.square().sum().backward()
    out_ref.square().sum().backward()
    assert_same_gradients(fast, reference)


@pytest.mark.parametrize('dtype,tolerance', [
    (torch.float64, 1e-10), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_models_cast_to_another_dtype_agree_in_it(dtype, tolerance):
    """Both forms in the dtype they were cast to: the same outputs and gradients, the gradients of the
    model's dtype; half precision to its rounding, measured against the reference form in the same dtype
    (where the stem's conv biases, whose true gradient under BatchNorm is 0, are rounding noise)."""
    fast, reference = perturbed_pair()
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    outputs = []
    for model in (fast, reference):
        model.to(dtype).train()
        out = model(x)
        assert out.dtype == dtype
        out.float().square().sum().backward()
        outputs.append(out)
    scale = outputs[1].abs().max()
    assert (outputs[0] - outputs[1]).abs().max() <= tolerance * scale
    assert_same_gradients(fast, reference, tolerance=10 * tolerance, floor_fraction=max(1e-2, 10 * tolerance))


@pytest.mark.parametrize('amp_dtype', [torch.bfloat16, torch.float16])
def test_fast_and_reference_agree_under_autocast(amp_dtype):
    fast, reference = perturbed_pair()
    x = torch.randn(2, 3, 64, 64)
    outputs = []
    for model in (fast, reference):
        with torch.autocast('cpu', dtype=amp_dtype):
            out = model(x)
        assert out.dtype == amp_dtype
        out.float().square().sum().backward()
        outputs.append(out.float())
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-2 * outputs[1].abs().max()
    for (name, p), q in zip(fast.named_parameters(), reference.parameters()):
        assert p.grad.dtype == torch.float32, name
    grads = torch.cat([p.grad.flatten() for p in fast.parameters()])
    expected = torch.cat([q.grad.flatten() for q in reference.parameters()])
    assert torch.nn.functional.cosine_similarity(grads, expected, dim=0) > 0.999


@pytest.mark.parametrize('impl', ['fast', 'reference'])
def test_gqpe_maps_are_made_in_float32_under_autocast_and_in_half_models(impl):
    fast, reference = perturbed_pair()
    model = (fast if impl == 'fast' else reference).eval()
    map_dtypes = []
    for module in model.modules():
        if isinstance(module, PoSGU):
            module.pos.register_forward_hook(lambda module, args, out: map_dtypes.append(out.dtype))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
    with torch.no_grad():
        model.to(torch.float16)(x.half())
    assert len(map_dtypes) == 8 and all(d == torch.float32 for d in map_dtypes)


def test_inference_without_autograd_agrees_and_keeps_inputs():
    fast, reference = perturbed_pair()
    x = torch.randn(2, 3, 72, 72)
    kept = x.clone()
    with torch.no_grad():
        expected = reference.eval()(x)
    for model in (fast.eval(), copy.deepcopy(fast).fuse()):
        for no_autograd in (torch.no_grad, torch.inference_mode):
            with no_autograd():
                torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(x, kept)


@pytest.mark.parametrize('variant', VARIANTS + [dict(gate='sgu')], ids=lambda v: '-'.join(map(str, v.values())))
@pytest.mark.parametrize('impl', ['fast', 'reference'])
def test_fused_model_equals_the_unfused_one(variant, impl):
    fast, reference = perturbed_pair(**variant)
    model = (fast if impl == 'fast' else reference).eval()
    with torch.no_grad():
        expected = [model(torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(side)))
                    for side in (64, 72)]
    via_timm = timm.utils.reparameterize_model(model)  # a fused copy; the model itself is unchanged
    assert isinstance(model.stem, type(fast.stem))
    fused = model.fuse()
    assert fused is model
    for candidate in (via_timm, fused):
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in candidate.modules())
        with torch.no_grad():
            for side, want in zip((64, 72), expected):
                got = candidate(torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(side)))
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if variant['gate'] != 'sgu':
        assert all(isinstance(m.pos, FrozenMaps) for m in fused.modules() if isinstance(m, PoSGU))


def test_fusing_twice_and_fused_state_dicts_round_trip():
    fast, _ = perturbed_pair()
    fused = copy.deepcopy(fast).fuse()
    state = fused.state_dict()
    assert any(name.endswith('.pos.maps') for name in state)
    again = timm.utils.reparameterize_model(fused)  # nothing left to fuse: same modules, same outputs
    assert [type(m) for m in again.modules()] == [type(m) for m in fused.modules()]
    # A fused model made from other weights takes the first one's state dict, frozen maps included.
    other = timm.create_model('posmlp_t', **KWARGS).fuse()
    other.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other(x), fused(x), atol=0, rtol=0)
    # An unfused state dict does not fit a fused model: its frozen maps would be stale.
    with pytest.raises(RuntimeError, match='Missing key'):
        other.load_state_dict(fast.state_dict())


def test_a_fused_model_refuses_to_train():
    # Its stored maps would stay behind their parameters, which an optimizer would still move and decay.
    fused = perturbed_pair()[0].fuse()
    with pytest.raises(RuntimeError, match='a fused PosMLP is for inference'):
        fused.train()
    fused.eval()  # evaluation and inference stay allowed
    assert not fused.training


def test_frozen_maps_are_the_encoders_and_padding_still_masks():
    fast, _ = perturbed_pair()
    gate = fast.stages[0].blocks[0].gate
    with torch.no_grad():
        expected = gate.pos()
    invalid = torch.zeros(4, 16, dtype=torch.bool)
    invalid[3, 12:] = True
    masked = gate.pos(invalid)
    gate.fuse()
    assert torch.equal(gate.pos(), expected) and gate.pos.maps.dtype == torch.float32
    torch.testing.assert_close(gate.pos(invalid), masked, atol=0, rtol=0)


def test_frozen_positional_parameters_get_no_gradient():
    fast, reference = perturbed_pair()
    for model in (fast, reference):
        for name, p in model.named_parameters():
            p.requires_grad_('.gate.' not in name)
        model(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))).square().sum().backward()
    assert_same_gradients(fast, reference)
    assert all(p.grad is None for name, p in fast.named_parameters() if '.gate.' in name)


@pytest.mark.parametrize('training', [False, True])
def test_double_backward_follows_reference(training):
    """Input-gradient penalties differentiate the backward itself (create_graph=True)."""
    fast, reference = perturbed_pair()
    x = torch.randn(2, 3, 64, 64)
    for model in (fast, reference):
        model.train(training)
        inputs = x.clone().requires_grad_()
        input_grad, = torch.autograd.grad(model(inputs).square().sum(), inputs, create_graph=True)
        input_grad.square().sum().backward()
    assert_same_gradients(fast, reference)


def test_block_hooks_fire_in_both_forms_and_sub_layer_hooks_in_the_reference_form():
    """The fast form runs fc1 -> act -> gate -> fc2 as one piece: hooks on blocks and on the norm fire in
    both forms and see the same tensors; hooks on fc1, fc2 and the gate only in the reference form."""
    fast, reference = perturbed_pair()
    x = torch.randn(2, 3, 64, 64)
    seen = {}

    def keep(key, value):  # returns None: the hooks only watch
        seen.setdefault(key, value)

    for form, model in (('fast', fast), ('reference', reference)):
        block = model.stages[0].blocks[0]
        for name in ('', 'norm', 'fc1', 'gate', 'fc2'):
            module = block.get_submodule(name)
            module.register_forward_hook(lambda m, args, out, key=(form, name): keep(key, out.detach()))
            module.register_full_backward_hook(lambda m, grad_in, grad_out, key=(form, name, 'grad'): keep(key, 1))
        model(x).sum().backward()
    for name in ('', 'norm'):
        torch.testing.assert_close(seen['fast', name], seen['reference', name], atol=1e-5, rtol=1e-5)
        assert ('fast', name, 'grad') in seen and ('reference', name, 'grad') in seen
    for name in ('fc1', 'gate', 'fc2'):
        assert ('reference', name) in seen and ('fast', name) not in seen


def test_a_hook_can_change_what_the_block_computes():
    """A hook that replaces a block's output or its positional maps acts in both forms alike."""
    fast, reference = perturbed_pair()
    x = torch.randn(2, 3, 64, 64)
    outputs = []
    for model in (fast.eval(), reference.eval()):
        model.stages[0].blocks[0].gate.pos.register_forward_hook(lambda m, args, out: torch.zeros_like(out))
        model.stages[1].blocks[0].register_forward_hook(lambda m, args, out: out * 2)
        with torch.no_grad():
            outputs.append(model(x))
    torch.testing.assert_close(*outputs, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert (outputs[0] - perturbed_pair()[0].eval()(x)).abs().max() > 1e-3


def test_flop_counter_and_profiler_see_the_same_work_in_both_forms():
    fast, reference = perturbed_pair()
    x = torch.randn(2, 3, 64, 64)
    flops = []
    for model in (fast, reference):
        counter = FlopCounterMode(display=False)
        with counter:
            model(x).sum().backward()
        flops.append(counter.get_total_flops())
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            model(x)
        assert any('addmm' in event.name or 'einsum' in event.name for event in profile.events())
    assert flops[0] == flops[1] > 0


def test_torch_func_transforms_follow_reference():
    """vmap, jacrev and functional ensembles wrap tensors: the fast model runs them as the reference does
    (eval mode: BatchNorm's running statistics cannot be updated under vmap)."""
    fast, reference = perturbed_pair()
    x = torch.randn(2, 3, 64, 64)
    results = []
    for model in (fast.eval(), reference.eval()):
        with torch.no_grad():
            batched = torch.func.vmap(model)(x[:, None])
        jacobian = torch.func.jacrev(model)(x[:1])
        params, buffers = torch.func.stack_module_state([model, model])
        ensemble = torch.func.vmap(lambda p, b: torch.func.functional_call(model, (p, b), (x,)))(params, buffers)
        results.append((batched, jacobian, ensemble))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_torch_func_grad_of_a_training_step_equals_autograd():
    fast, reference = perturbed_pair()
    x, target = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])

    def loss(params, buffers, model):  # BatchNorm updates its statistics: buffers are inputs, not captured
        out = torch.func.functional_call(model, (params, buffers), (x,))
        return torch.nn.functional.cross_entropy(out, target)

    reference.train()
    torch.nn.functional.cross_entropy(reference(x), target).backward()
    fast.train()
    buffers = {name: b.clone() for name, b in fast.named_buffers()}
    grads = torch.func.grad(loss)(dict(fast.named_parameters()), buffers, fast)
    for name, p in fast.named_parameters():
        p.grad = grads[name]
    assert_same_gradients(fast, reference)


@pytest.mark.parametrize('impl', ['fast', 'reference'])
@pytest.mark.parametrize('grad', [False, True])
def test_traced_model_records_how_maps_are_made(impl, grad):
    model = timm.create_model('posmlp_t', gate_impl=impl, **KWARGS).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(model, x)  # checks the trace against a second, no-grad trace
        other, _ = perturbed_pair()
        # Traced modules keep the derived buffers that state dicts leave out.
        traced.load_state_dict(other.state_dict(), strict=False)
        expected = other.eval()(x)
        assert (traced(x) - expected).abs().max() <= 1e-5


def test_whole_model_compiles_without_graph_breaks_and_exports():
    model = timm.create_model('posmlp_t', gate_impl='fast', **KWARGS)
    # fullgraph=True turns any graph break into an error; the eager backend keeps the test quick.
    compiled = torch.compile(model, fullgraph=True, backend='eager', dynamic=False)
    x = torch.randn(2, 3, 64, 64)
    compiled(x).sum().backward()  # training graph, forward and backward
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
        compiled(torch.randn(1, 3, 72, 72))  # a padded input compiles too
    fused = copy.deepcopy(model).fuse()
    for program in (model, fused):
        exported = torch.export.export(program, (x,)).module()
        with torch.no_grad():
            torch.testing.assert_close(exported(x), model(x), atol=1e-5, rtol=1e-5)


def test_model_built_or_loaded_in_inference_mode_runs_and_follows_its_weights():
    _, reference = perturbed_pair()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        built = timm.create_model('posmlp_t', gate_impl='fast', **KWARGS).eval()
        assert (built(x) - reference.eval()(x)).abs().max() > 1e-3
        built.load_state_dict(reference.state_dict())
        torch.testing.assert_close(built(x), reference(x), atol=1e-5, rtol=1e-5)
    built = timm.create_model('posmlp_t', gate_impl='fast', **KWARGS).eval()
    with torch.inference_mode():
        built.load_state_dict(reference.state_dict())
    assert not any(b.is_inference() for b in built.buffers())
    with torch.no_grad():
        torch.testing.assert_close(built(x), reference.eval()(x), atol=1e-5, rtol=1e-5)
    built.train()(x).sum().backward()


@pytest.mark.parametrize('gate', ['gqpe', 'lrpe'])
@pytest.mark.parametrize('impl', ['fast', 'reference'])
def test_model_built_on_meta_device_loads_exactly(gate, impl):
    """State dicts leave out the buffers derived from the window size: loading into a model built on the
    meta device rebuilds them, and so does timm's reinit_non_persistent_buffers."""
    kwargs = dict(KWARGS, gate=gate, gate_impl=impl)
    fast, reference = perturbed_pair(gate=gate)
    source = fast if impl == 'fast' else reference
    state = source.state_dict()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source.eval()(x)
    for assign in (False, True):
        with torch.device('meta'):
            model = timm.create_model('posmlp_t', **kwargs)
        if not assign:
            model.to_empty(device='cpu')
        model.load_state_dict(state, assign=assign)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), expected, atol=0, rtol=0)

    with torch.device('meta'):
        model = timm.create_model('posmlp_t', **kwargs)
    model.to_empty(device='cpu').eval()
    model.load_state_dict(state)
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name in ('rel_features', 'rel_index'):
                buffer.fill_(7)
    assert reinit_non_persistent_buffers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
