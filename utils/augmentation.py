"""timm's augmentation policies, made to run on every Pillow that requirements.txt allows.

timm's posterize op (in RandAugment, AutoAugment and AugMix) keeps `4 - int(m / 10 * 4)` bits with
`inc1` and `int(m / 10 * 4)` without, so 0 bits at magnitude 10 or 0, and fewer than 0 with `mmax`
above 10. Pillow before 13 gave a black image for those (its mask keeps no bit); Pillow 13 refuses them
(ValueError: bits must be between or equal to 1 and 8), which stopped a run a few hundred images in.
`posterize` gives Pillow 12's result, and timm's policies are built with it.
"""
from PIL import Image
from timm.data import auto_augment

TIMM_POSTERIZE = auto_augment.posterize


def posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize op; fewer than 1 bit kept gives a black image, as Pillow before 13 did."""
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return TIMM_POSTERIZE(img, bits_to_keep, **kwargs)


def use_exact_posterize():
    """Make timm's policies created from now on use `posterize` (their ops look it up when they are made,
    and a DataLoader worker, forked or spawned, receives the op with the function it holds)."""
    for name, op in auto_augment.NAME_TO_OP.items():
        if op is TIMM_POSTERIZE:
            auto_augment.NAME_TO_OP[name] = posterize
