"""ResMLP-B24 with 16 x 16 patches, the ResMLP-B24 (116M parameters) of ViP's comparison table.

timm's `resmlp_big_24_224` is the patch-8 model (129M); this is the same network on 16 x 16 patches, made
from timm's own classes (`MlpMixer` with `ResBlock` blocks and `Affine` norms, layer scale 1e-6), so it is
timm's ResMLP in every respect but the patch size. Paper: "ResMLP: Feedforward networks for image
classification with data-efficient training" (Touvron et al., arXiv 2105.03404).
"""
from functools import partial

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock, checkpoint_filter_fn

__all__ = ['resmlp_b24_224']

# As timm's ResMLP configs: no published weights for this size.
default_cfgs = generate_default_cfgs({
    'resmlp_b24_224': dict(
        num_classes=1000, input_size=(3, 224, 224), pool_size=None, fixed_input_size=True, crop_pct=0.875,
        interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv='stem.proj',
        classifier='head', paper_ids='arXiv:2105.03404', license='apache-2.0',
        origin_url='https://github.com/huggingface/pytorch-image-models',
    ),
})


@register_model
def resmlp_b24_224(pretrained: bool = False, **kwargs) -> MlpMixer:
    """ResMLP-B24 on 16 x 16 patches: width 768, 24 blocks, MLP ratio 4; 115.7M parameters."""
    model_args = dict(
        patch_size=16, num_blocks=24, embed_dim=768, mlp_ratio=4,
        block_layer=partial(ResBlock, init_values=1e-6), norm_layer=Affine,
    )
    return build_model_with_cfg(
        MlpMixer, 'resmlp_b24_224', pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=kwargs.pop('out_indices', 3), feature_cls='getter'),
        **dict(model_args, **kwargs),
    )
