"""Any input size (padding kept out of the mixing) and timm's intermediate-feature API."""
import pytest
import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401  (registers the models)
import models.posmlp as posmlp
from conftest import TINY_KWARGS, reference_path

KWARGS = dict(TINY_KWARGS, img_size=64, win_size=(4, 4, 2, 2), num_classes=5)


def test_divisible_sizes_are_unchanged_by_padding_support():
    """At a size that divides into the windows, the padding-capable model is the strict one."""
    torch.manual_seed(0)
    padded = timm.create_model('posmlp_t', dynamic_img_pad=True, **KWARGS).eval()
    strict = timm.create_model('posmlp_t', dynamic_img_pad=False, **KWARGS).eval()
    strict.load_state_dict(padded.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(padded(x), strict(x))
    io = torch.load(reference_path('gqpe_tiny_io.pt'), weights_only=True)
    model = models.create_model_from_checkpoint(
        str(reference_path('gqpe_tiny_original_checkpoint.pth.tar')), dynamic_img_pad=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(io['input']), io['logits_ema'], atol=1e-4, rtol=0)


@pytest.mark.parametrize('gate', ['gqpe', 'lrpe', 'sgu'])
@pytest.mark.parametrize('impl', ['fast', 'reference'])
def test_padded_tokens_do_not_reach_real_ones(gate, impl, monkeypatch):
    """Fill the padding with noise instead of zeros: no real token's output may change."""
    torch.manual_seed(0)
    model = timm.create_model('posmlp_t', gate=gate, gate_impl=impl, **KWARGS).eval()
    with torch.no_grad():  # away from the init, where SGU's near-zero mixing would hide a leak
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 3, 88, 72)  # maps 22x18, 11x9, 6x5, 3x3: every stage pads
    with torch.no_grad():
        clean = model.forward_intermediates(x, intermediates_only=True)

    zero_pad = F.pad

    def pad_with_noise(t, pad, *args, **kwargs):
        out = zero_pad(t, pad, *args, **kwargs)
        is_padding = zero_pad(torch.zeros_like(t), pad, value=1.0).bool()
        return torch.where(is_padding, torch.randn_like(out) * 100, out)

    monkeypatch.setattr(F, 'pad', pad_with_noise)
    with torch.no_grad():
        noisy = model.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(clean, noisy):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_masked_maps_only_weigh_real_tokens():
    gqpe = posmlp.GQPE(4, 3)
    invalid = torch.zeros(2, 16, dtype=torch.bool)
    invalid[1, 12:] = True  # second window: its last row is padding
    maps = gqpe(invalid)
    assert maps.shape == (2, 3, 16, 16)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 3, 16))
    assert maps[1, ..., 12:].abs().max() == 0
    torch.testing.assert_close(maps[0], gqpe())


def test_classification_at_a_size_that_does_not_divide():
    model = timm.create_model('posmlp_t', num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 256, 256)).shape == (1, 10)


def test_timm_feature_extraction_at_detection_size():
    model = timm.create_model('posmlp_t', features_only=True, out_indices=(0, 1, 2, 3)).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 800, 608))
    assert [tuple(f.shape) for f in feats] == [
        (1, 96, 200, 152), (1, 192, 100, 76), (1, 384, 50, 38), (1, 768, 25, 19)]
    assert all(torch.isfinite(f).all() for f in feats)


def test_forward_intermediates_options():
    torch.manual_seed(0)
    model = timm.create_model('posmlp_t', **KWARGS).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert [t.shape[1:] for t in inter] == [(8, 16, 16), (16, 8, 8), (16, 4, 4), (32, 2, 2)]
        torch.testing.assert_close(final, model.forward_features(x))
        only = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        assert len(only) == 2 and torch.equal(only[1], inter[2])
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert torch.equal(last_two[0], inter[2])
        normed = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], final)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert torch.equal(early[0], inter[1])
        nhwc = model.forward_intermediates(x, output_fmt='NHWC', intermediates_only=True)
        assert torch.equal(nhwc[0], inter[0].permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match='output_fmt'):
        model.forward_intermediates(x, output_fmt='NLC')


def test_prune_intermediate_layers_and_feature_getter():
    model = timm.create_model('posmlp_t', **KWARGS).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        inter = model.forward_intermediates(x, intermediates_only=True)
    kept = model.prune_intermediate_layers(indices=[1], prune_norm=True)
    assert kept == [1] and len(model.stages) == 2 and model.num_classes == 0
    with torch.no_grad():
        assert torch.equal(model.forward_intermediates(x, indices=[1], intermediates_only=True)[0], inter[1])

    getter = timm.create_model('posmlp_t', features_only=True, out_indices=(1, 3), **KWARGS).eval()
    assert getter.feature_info.channels() == [16, 32]
    with torch.no_grad():
        assert [tuple(f.shape) for f in getter(x)] == [(1, 16, 8, 8), (1, 32, 2, 2)]
