"""The fast PoSGU form against the direct reference form: same function, same gradients, cached maps."""
import pytest
import timm
import torch

import models  # noqa: F401  (registers the models)
from models.posmlp import GeluGateFn, PoSGU
from timm.models._manipulate import reinit_non_persistent_buffers
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
    reference = timm.create_model('posmlp_t', gate_impl='reference', **dict(KWARGS, **kwargs))
    reference.load_state_dict(fast.state_dict())
    return fast, reference


def relative_error(a, b, floor):
    """|a - b| / |b|, with |b| floored: a conv bias feeding BatchNorm in training has a true gradient of
    zero, so its computed gradient is rounding noise that no relative comparison can judge."""
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


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
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    floor = 1e-3 * torch.stack([g.norm() for g in ref_grads.values()]).norm()
    for name, p in fast.named_parameters():
        assert relative_error(p.grad, ref_grads[name], floor) < 1e-4, name


@pytest.mark.parametrize('training', [False, True])
@pytest.mark.parametrize('side', [64, 72])
def test_inference_without_autograd_agrees_and_keeps_inputs(training, side):
    """Without autograd the fast block works in place; it must not touch its input."""
    fast, reference = perturbed_pair()
    fast.train(training)
    reference.train(training)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        expected = reference(x)
    for no_autograd in (torch.no_grad, torch.inference_mode):
        with no_autograd():
            assert (fast(x) - expected).abs().max().item() <= 1e-4
    block = fast.stages[0].blocks[0]
    tokens = torch.randn(2, 4, 16, block.norm.normalized_shape[0])
    kept = tokens.clone()
    with torch.no_grad():
        out = block(tokens)
    assert torch.equal(tokens, kept)
    assert (out - block(tokens)).abs().max().item() <= 1e-5


def test_hand_written_gate_backward_passes_gradcheck():
    torch.manual_seed(0)
    gamma, N = 3, 5
    h = torch.randn(2 * 2 * gamma, 2 * N, dtype=torch.float64)  # (2D, M): two channels per group, two windows
    maps = torch.randn(gamma, N, N, dtype=torch.float64).softmax(-1)
    bias = torch.randn(1, N, 1, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (h, maps, bias)]
    assert torch.autograd.gradcheck(GeluGateFn.apply, inputs)


def test_frozen_positional_parameters_get_no_gradient():
    fast, reference = perturbed_pair()
    for model in (fast, reference):
        for name, p in model.named_parameters():
            p.requires_grad_('.gate.' not in name)
        model(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))).square().sum().backward()
    floor = 1e-3 * torch.stack([q.grad.norm() for q in reference.parameters() if q.grad is not None]).norm()
    for (name, p), q in zip(fast.named_parameters(), reference.parameters()):
        if '.gate.' in name:
            assert p.grad is None, name
        else:
            assert relative_error(p.grad, q.grad, floor) < 1e-4, name


def test_training_under_bfloat16_autocast_follows_float32():
    fast, reference = perturbed_pair()
    x = torch.randn(2, 3, 64, 64)
    reference(x).square().sum().backward()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = fast(x)
    out.float().square().sum().backward()
    for (name, p), q in zip(fast.named_parameters(), reference.parameters()):
        assert p.grad.dtype == p.dtype, name
    grads = torch.cat([p.grad.flatten() for p in fast.parameters()])
    expected = torch.cat([q.grad.flatten() for q in reference.parameters()])
    assert torch.nn.functional.cosine_similarity(grads, expected, dim=0) > 0.99


def test_hooks_and_replaced_modules_take_effect():
    """The fast block reads fc1/fc2's weights and reuses LayerNorm's output: a block whose modules carry
    hooks or were replaced must run them as modules, and a hook must never see its tensor overwritten."""
    fast, _ = perturbed_pair()
    fast.eval()
    block = fast.stages[0].blocks[0]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = fast(x)
    seen = {}

    def keep(name):
        def hook(module, args, out):
            seen[name] = (out, out.clone())
        return hook

    handles = [block.fc1.register_forward_hook(keep('fc1')), block.norm.register_forward_hook(keep('norm'))]
    with torch.no_grad():
        out = fast(x)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    assert 'fc1' in seen
    for name, (out_now, out_when_made) in seen.items():
        assert torch.equal(out_now, out_when_made), name

    calls = []

    def record(module, args, out):
        calls.append(module)

    with torch.nn.modules.module.register_module_forward_hook(record), torch.no_grad():
        fast(x)
    assert block.fc2 in calls

    fast.train()
    grads_seen = []
    with block.fc1.register_full_backward_hook(lambda module, grad_in, grad_out: grads_seen.append(1)):
        fast(x).sum().backward()
    assert grads_seen

    # A norm that hands back its input must not let the block write into the caller's tensor.
    fast.eval()
    block.norm = torch.nn.Identity()
    tokens = torch.randn(2, 16, 16, block.fc1.in_features)
    kept = tokens.clone()
    with torch.no_grad():
        block(tokens)
    assert torch.equal(tokens, kept)

    block.act = torch.nn.ReLU()
    with torch.no_grad():
        assert (fast(x) - expected).abs().max().item() > 1e-3


def gates(model):
    return [m for m in model.modules() if isinstance(m, PoSGU)]


def test_maps_are_cached_for_inference_and_invalidated():
    fast, reference = perturbed_pair()
    fast.eval()
    reference.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast(x)
        cached = [g._cached_maps for g in gates(fast)]
        fast(x)
        assert all(a is g._cached_maps for a, g in zip(cached, gates(fast)))

    # An optimizer step changes the parameters in place: the next inference must see it.
    optimizer = torch.optim.SGD(fast.parameters(), lr=0.5)
    fast.train()
    fast(x).square().sum().backward()
    optimizer.step()
    fast.eval()
    reference.load_state_dict(fast.state_dict())
    with torch.no_grad():
        assert (fast(x) - reference(x)).abs().max() <= 1e-4

    # Loading a state dict, too.
    fresh, _ = perturbed_pair(gate='gqpe')
    with torch.no_grad():
        fresh.stages[0].blocks[0].gate.pos.centers.add_(1.0)
    fast.load_state_dict(fresh.state_dict())
    reference.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        assert (fast(x) - reference(x)).abs().max() <= 1e-4

        # `.data` edits (hand-written EMA updates) bypass the version counter; eval() drops the cache.
        for g in gates(fast):
            g.pos.centers.data.add_(0.5)
        fast.eval()
        reference.load_state_dict(fast.state_dict())
        assert (fast(x) - reference(x)).abs().max() <= 1e-4

    fast.train()
    assert all(g._cached_maps is None for g in gates(fast))


def test_model_made_in_inference_mode_runs_and_follows_its_weights():
    _, reference = perturbed_pair()
    reference.eval()
    x = torch.randn(2, 3, 64, 64)
    # Its tensors have no version counter at all, so nothing may rely on one.
    with torch.inference_mode():
        built = timm.create_model('posmlp_t', gate_impl='fast', **KWARGS).eval()
        assert (built(x) - reference(x)).abs().max() > 1e-3
        built.load_state_dict(reference.state_dict())
        assert (built(x) - reference(x)).abs().max() <= 1e-4

    # Loaded under inference_mode, a normally built model keeps normal derived buffers: it still caches
    # its maps, and it still trains.
    built = timm.create_model('posmlp_t', gate_impl='fast', **KWARGS).eval()
    with torch.inference_mode():
        built.load_state_dict(reference.state_dict())
    assert not any(b.is_inference() for b in built.buffers())
    with torch.no_grad():
        assert (built(x) - reference(x)).abs().max() <= 1e-4
    assert all(g._cached_maps is not None for g in gates(built))
    built.train()(x).sum().backward()


@pytest.mark.parametrize('gate', ['gqpe', 'lrpe'])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float64])
def test_models_cast_to_another_dtype_run_in_it(gate, dtype):
    fast, reference = perturbed_pair(gate=gate)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference.eval()(x)
    for model in (fast, reference):
        model.to(dtype)
        with torch.no_grad():
            out = model.eval()(x.to(dtype))
        assert out.dtype == dtype
        assert (out.double() - expected).abs().max() <= (1e-5 if dtype == torch.float64 else 0.05)
        model.train()(x.to(dtype)).sum().backward()


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


def test_no_cache_when_gradients_can_flow():
    fast, _ = perturbed_pair()
    fast.eval()
    fast(torch.randn(1, 3, 64, 64)).sum().backward()
    assert all(g._cached_maps is None for g in gates(fast))
    assert all(g.pos.centers.grad is not None for g in gates(fast))


def test_whole_model_compiles_without_graph_breaks():
    model = timm.create_model('posmlp_t', gate_impl='fast', **KWARGS)
    # fullgraph=True turns any graph break into an error; the eager backend keeps the test quick.
    compiled = torch.compile(model, fullgraph=True, backend='eager', dynamic=False)
    x = torch.randn(2, 3, 64, 64)
    compiled(x).sum().backward()  # training graph, forward and backward
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    # A padded input compiles too.
    with torch.no_grad():
        compiled(torch.randn(1, 3, 72, 72))
    exported = torch.export.export(model, (x,)).module()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('gate', ['gqpe', 'lrpe'])
def test_softmax_stays_float32_under_autocast(gate):
    fast, reference = perturbed_pair(gate=gate)
    fast.eval()
    map_dtypes = []
    for g in gates(fast):
        g.pos.register_forward_hook(lambda module, args, out: map_dtypes.append(out.dtype))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference.eval()(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = fast(x)
    assert out.dtype == torch.bfloat16
    assert map_dtypes and all(d == torch.float32 for d in map_dtypes)
    assert (out.float() - expected).abs().max() < 0.1 * expected.abs().max()


@pytest.mark.parametrize('gate', ['gqpe', 'lrpe'])
def test_hooks_on_the_positional_encoder_act_every_call_and_leave_nothing_cached(gate):
    """gate.pos is a grandchild of the block, and its maps are cached for inference: a hook registered
    after a cached forward must still act, and once removed, must leave no ablated maps behind."""
    fast, reference = perturbed_pair(gate=gate)
    fast.eval()
    reference.eval()
    x = torch.randn(2, 3, 64, 64)
    ablated = {}
    with torch.no_grad():
        expected = fast(x)  # fills the cache
        for name, model in (('fast', fast), ('reference', reference)):
            handle = model.stages[0].blocks[0].gate.pos.register_forward_hook(
                lambda module, args, out: torch.zeros_like(out))
            ablated[name] = model(x)
            handle.remove()
        assert (ablated['fast'] - expected).abs().max() > 1e-3
        torch.testing.assert_close(ablated['fast'], ablated['reference'], atol=1e-4, rtol=0)
        torch.testing.assert_close(fast(x), expected, atol=0, rtol=0)


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

    # Loaded first, buffers rebuilt after an inference has cached maps made from uninitialised ones.
    with torch.device('meta'):
        model = timm.create_model('posmlp_t', **kwargs)
    model.to_empty(device='cpu').eval()
    model.load_state_dict(state)
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name in ('rel_features', 'rel_index'):
                buffer.fill_(7)
    with torch.no_grad():
        model(x)
        assert reinit_non_persistent_buffers(model)
        torch.testing.assert_close(model(x), expected, atol=0, rtol=0)


def test_hand_written_gate_backward_is_differentiable():
    torch.manual_seed(0)
    gamma, N = 3, 5
    h = torch.randn(2 * 2 * gamma, 2 * N, dtype=torch.float64)
    maps = torch.randn(gamma, N, N, dtype=torch.float64).softmax(-1)
    bias = torch.randn(1, N, 1, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (h, maps, bias)]
    assert torch.autograd.gradgradcheck(GeluGateFn.apply, inputs)


@pytest.mark.parametrize('training', [False, True])
def test_double_backward_follows_reference(training):
    """Input-gradient penalties differentiate the backward itself (create_graph=True)."""
    fast, reference = perturbed_pair()
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for model in (fast, reference):
        model.train(training)
        inputs = x.clone().requires_grad_()
        input_grad, = torch.autograd.grad(model(inputs).square().sum(), inputs, create_graph=True)
        input_grad.square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    floor = 1e-3 * torch.stack([g.norm() for g in grads[1].values()]).norm()
    for name, grad in grads[0].items():
        assert relative_error(grad, grads[1][name], floor) < 1e-4, name


def test_torch_func_transforms_follow_reference():
    """vmap, jacrev and functional ensembles wrap tensors: the fast model must run them as the reference
    does (BatchNorm's running statistics keep the stem to eval mode under these transforms)."""
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
