"""utils/images.py: images are labelled by the class folder directly under the split, and every Pillow mode
becomes the 8-bit RGB a person would see, checked against conversions written here in numpy."""
import io
import logging

import numpy as np
import pytest
import timm
from PIL import Image

from conftest import TINY_KWARGS, make_image_folder

import models
import train
import validate
from utils.data import class_to_idx, create_split_dataset, create_training_datasets, unreadable_count
from utils import images
from utils.errors import DataError
from utils.images import read_rgb, to_rgb

RNG = np.random.default_rng(0)


# Labels -----------------------------------------------------------------------------------------------------------

def add_png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (8, 8), (value, value, value)).save(path)


def labels_by_file(dataset) -> dict:
    names = {label: name for name, label in class_to_idx(dataset).items()}
    return {'/'.join(path.split('/')[-3:]): names[label] for path, label in dataset.reader.samples}


def test_images_below_a_class_folder_belong_to_it_and_are_counted(tmp_path, caplog):
    data = make_image_folder(tmp_path / 'data', classes=('n01', 'n02'), per_class=1)
    add_png(data / 'train' / 'n01' / 'extra_shots' / 'x.png')
    add_png(data / 'train' / 'n01' / 'n02' / 'y.png')  # a folder named like another class: still n01's
    add_png(data / 'val' / 'n02' / 'deeper' / 'still' / 'z.png')
    with caplog.at_level(logging.INFO):
        train_set, val_set = create_training_datasets('', str(data), 'train', 'validation', None)
    assert class_to_idx(train_set) == {'n01': 0, 'n02': 1} == class_to_idx(val_set)
    assert labels_by_file(train_set) == {'train/n01/n01_0.png': 'n01', 'n01/extra_shots/x.png': 'n01',
                                         'n01/n02/y.png': 'n01', 'train/n02/n02_0.png': 'n02'}
    assert labels_by_file(val_set)['deeper/still/z.png'] == 'n02'
    assert f'{data / "train"}: 2 of 4 images lie in subfolders of their class folder' in caplog.text
    assert f'{data / "val"}: 1 of 3 images lie in subfolders' in caplog.text


def test_an_empty_class_folder_is_refused_by_name_unless_kept(tmp_path):
    data = make_image_folder(tmp_path / 'data', classes=('a', 'c'), per_class=1)
    (data / 'train' / 'b' / 'only_notes').mkdir(parents=True)
    (data / 'train' / 'b' / 'only_notes' / 'notes.txt').write_text('no images here')
    with pytest.raises(DataError, match=r'/train has class folders with no images .* at any depth: b\. Remove them, '
                                        r'or pass --keep-empty-classes'):
        create_training_datasets('', str(data), 'train', 'validation', None)
    train_set, val_set = create_training_datasets('', str(data), 'train', 'validation', None, keep_empty_classes=True)
    assert class_to_idx(train_set) == {'a': 0, 'b': 1, 'c': 2} == class_to_idx(val_set)
    assert sorted(label for _, label in val_set.reader.samples) == [0, 2]


def test_train_refuses_an_empty_class_folder_in_one_line(tmp_path, capsys, in_process_run):
    data = make_image_folder(tmp_path / 'data', per_class=1)
    (data / 'train' / 'empty_class').mkdir()
    argv = [str(data), '--model-kwargs', *[f'{k}={v!r}' for k, v in TINY_KWARGS.items()], '-b', '2', '-j', '0',
            '--epochs', '1', '--warmup-epochs', '0', '--output', str(tmp_path / 'out')]
    assert train.main(argv) == 1
    out = capsys.readouterr().out
    assert 'empty_class. Remove them, or pass --keep-empty-classes' in out and 'Traceback' not in out


def test_validate_labels_by_the_same_rule(tmp_path, capsys, in_process_run):
    """An image in a subfolder of class b is b's; an empty class folder is refused there too."""
    data = make_image_folder(tmp_path / 'data', per_class=1, splits=('val',))
    add_png(data / 'val' / 'b' / 'crops' / 'b_extra.png')
    checkpoint = tmp_path / 'tiny.pth.tar'
    kwargs = dict(TINY_KWARGS, num_classes=3)
    models.save_checkpoint_file({'state_dict': timm.create_model('posmlp_t', **kwargs).state_dict(),
                                 'model_name': 'posmlp_t', 'model_kwargs': kwargs,
                                 'class_to_idx': {'a': 0, 'b': 1, 'c': 2}}, str(checkpoint))
    assert validate.main([str(data), '--checkpoint', str(checkpoint), '-j', '0']) == 0
    out = capsys.readouterr().out
    assert '"images": 4' in out and '1 of 4 images lie in subfolders of their class folder' in out
    dataset = create_split_dataset('', str(data / 'val'), 'validation', class_map={'a': 0, 'b': 1, 'c': 2})
    assert labels_by_file(dataset)['b/crops/b_extra.png'] == 'b'

    (data / 'val' / 'c' / 'c_0.png').unlink()
    assert validate.main([str(data), '--checkpoint', str(checkpoint), '-j', '0']) == 1
    assert 'no images' in capsys.readouterr().out
    assert validate.main([str(data), '--checkpoint', str(checkpoint), '-j', '0', '--keep-empty-classes']) == 0


def test_files_that_are_not_images_are_counted_and_other_image_formats_read(tmp_path, caplog):
    data = make_image_folder(tmp_path / 'data', classes=('a',), per_class=1, splits=('train',))
    (data / 'train' / 'a' / 'labels.csv').write_text('x')
    Image.new('RGB', (8, 8)).save(data / 'train' / 'a' / 'scan.tif')
    Image.new('RGB', (8, 8)).save(data / 'train' / 'a' / 'photo.webp')
    with caplog.at_level(logging.INFO):
        dataset = create_split_dataset('', str(data / 'train'), 'train')
    assert len(dataset) == 3
    assert '1 files in the class folders are not images by their extension' in caplog.text


def test_a_folder_that_cannot_be_listed_is_named_not_skipped(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / 'data', classes=('a',), per_class=1, splits=('train',))
    locked = data / 'train' / 'a' / 'locked'
    locked.mkdir()
    scandir = images.os.scandir

    def scandir_meeting_a_locked_folder(path):
        if str(path) == str(locked):  # as os.scandir reports it (root, which runs the tests, reads all)
            raise PermissionError(13, 'Permission denied', str(locked))
        return scandir(path)
    monkeypatch.setattr(images.os, 'scandir', scandir_meeting_a_locked_folder)
    with pytest.raises(DataError, match=f'cannot list {locked}: Permission denied; its images would be left out'):
        create_split_dataset('', str(data / 'train'), 'train')


def test_a_link_back_to_the_split_is_left_out_not_walked_again(tmp_path, caplog):
    """`ln -s .. train/cat/up` would list every image again below cat/up/..., dog's labelled cat."""
    data = make_image_folder(tmp_path / 'data', classes=('cat', 'dog'), per_class=4, splits=('train',))
    (data / 'train' / 'cat' / 'up').symlink_to('..')
    (data / 'train' / 'cat' / 'self').symlink_to('.')
    with caplog.at_level(logging.INFO):
        dataset = create_split_dataset('', str(data / 'train'), 'train')
    assert len(dataset) == 8
    assert labels_by_file(dataset) == {f'train/{c}/{c}_{i}.png': c for c in ('cat', 'dog') for i in range(4)}
    assert (f'{data / "train"}: left out 2 linked folders that lead back to the split, a class folder or a folder '
            f'already walked (a loop; their images are listed where they lie): {data / "train" / "cat" / "self"}, '
            f'{data / "train" / "cat" / "up"}. Remove the links.') in caplog.text
    assert 'subfolders of their class folder' not in caplog.text


def test_a_link_to_another_class_folder_is_left_out(tmp_path, caplog):
    data = make_image_folder(tmp_path / 'data', classes=('cat', 'dog'), per_class=2, splits=('train',))
    (data / 'train' / 'cat' / 'dogs_too').symlink_to(data / 'train' / 'dog')
    with caplog.at_level(logging.WARNING):
        dataset = create_split_dataset('', str(data / 'train'), 'train')
    assert sorted(labels_by_file(dataset).values()) == ['cat', 'cat', 'dog', 'dog']
    assert 'left out 1 linked folders' in caplog.text


def test_an_image_linked_under_two_class_folders_is_refused_naming_both(tmp_path):
    data = make_image_folder(tmp_path / 'data', classes=('cat', 'dog'), per_class=1, splits=('train',))
    add_png(data / 'train' / 'dog' / 'crops' / 'd.png')
    (data / 'train' / 'cat' / 'borrowed').symlink_to(data / 'train' / 'dog' / 'crops')
    with pytest.raises(DataError) as refused:
        create_split_dataset('', str(data / 'train'), 'train')
    assert (f'{data / "train" / "cat" / "borrowed" / "d.png"} and {data / "train" / "dog" / "crops" / "d.png"} are '
            f'the same image ({data / "train" / "dog" / "crops" / "d.png"}), reached through a link under class '
            f'folders cat and dog: it would carry both labels. Remove the link') in str(refused.value)
    (data / 'train' / 'cat' / 'borrowed').unlink()
    (data / 'train' / 'cat' / 'one.png').symlink_to(data / 'train' / 'dog' / 'dog_0.png')
    with pytest.raises(DataError, match='under class folders cat and dog: it would carry both labels. Remove the link'):
        create_split_dataset('', str(data / 'train'), 'train')


def test_an_image_reached_twice_in_its_class_folder_is_listed_once(tmp_path, caplog):
    data = make_image_folder(tmp_path / 'data', classes=('cat',), per_class=2, splits=('train',))
    (data / 'train' / 'cat' / 'again.png').symlink_to('cat_0.png')
    with caplog.at_level(logging.WARNING):
        dataset = create_split_dataset('', str(data / 'train'), 'train')
    assert sorted(labels_by_file(dataset)) == ['train/cat/cat_0.png', 'train/cat/cat_1.png']
    assert f'1 images are reached twice in their class folder through links and listed once: ' \
           f'{data / "train" / "cat" / "again.png"}' in caplog.text


def test_linked_class_folders_are_followed(tmp_path, caplog):
    """Class folders linked into place from a shared copy (of ImageNet, say), and linked folders within them."""
    shared = make_image_folder(tmp_path / 'shared', classes=('n01', 'n02'), per_class=2, splits=('train',))
    add_png(tmp_path / 'extra' / 'n01_extra.png')
    (shared / 'train' / 'n01' / 'extra').symlink_to(tmp_path / 'extra')
    split = tmp_path / 'data' / 'train'
    split.mkdir(parents=True)
    for name in ('n01', 'n02'):
        (split / name).symlink_to(shared / 'train' / name)
    with caplog.at_level(logging.WARNING):
        dataset = create_split_dataset('', str(split), 'train')
    assert labels_by_file(dataset) == {'train/n01/n01_0.png': 'n01', 'train/n01/n01_1.png': 'n01',
                                       'n01/extra/n01_extra.png': 'n01',
                                       'train/n02/n02_0.png': 'n02', 'train/n02/n02_1.png': 'n02'}
    assert all(path.startswith(str(split)) for path, _ in dataset.reader.samples)
    assert caplog.text == ''


# Pixels -----------------------------------------------------------------------------------------------------------

def rgb_of(image: Image.Image) -> np.ndarray:
    out = to_rgb(image)
    assert out.mode == 'RGB' and out.size == image.size
    return np.asarray(out).astype(np.int64)


def nearest(values) -> np.ndarray:
    """Rounded to the nearest level, halves up."""
    return np.floor(np.asarray(values, np.float64) + 0.5).astype(np.int64)


def grey(values) -> np.ndarray:
    """(H, W) levels as (H, W, 3) RGB, rounded to the nearest level."""
    return np.repeat(nearest(values)[..., None], 3, axis=-1)


def reopened(image: Image.Image, fmt: str) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    buffer.seek(0)
    return Image.open(buffer)


def over_white(colour, alpha) -> np.ndarray:
    colour, alpha = np.asarray(colour, np.float64), np.asarray(alpha, np.float64)[..., None] / 255.
    return nearest(colour * alpha + 255. * (1. - alpha))


UINT16 = np.array([[0, 1, 128, 257, 1000], [32767, 32768, 40000, 65534, 65535]], np.uint16)


@pytest.mark.parametrize('mode, dtype', [('I;16', '<u2'), ('I;16L', '<u2'), ('I;16B', '>u2'), ('I;16N', '=u2')])
def test_sixteen_bit_grey_is_scaled_by_257(mode, dtype):
    image = Image.frombytes(mode, (5, 2), UINT16.astype(dtype).tobytes())
    assert np.array_equal(rgb_of(image), grey(UINT16 / 257.))


def test_a_sixteen_bit_png_is_not_white():
    image = reopened(Image.fromarray(UINT16), 'PNG')
    assert image.mode == 'I;16'
    assert np.array_equal(rgb_of(image), grey(UINT16 / 257.))
    assert np.asarray(reopened(Image.fromarray(UINT16), 'PNG').convert('RGB'))[0, 2, 0] == 128  # Pillow clips


def test_sixteen_bit_pgm_opens_as_I_and_is_scaled_as_sixteen_bits():
    pgm = io.BytesIO(b'P5\n4 1\n1023\n' + np.array([0, 1, 512, 1023], '>u2').tobytes())
    image = Image.open(pgm)
    assert image.mode == 'I'
    assert np.array_equal(rgb_of(image), grey(np.array([[0, 1, 512, 1023]]) * 255. / 1023.))


def test_thirty_two_bit_tiff_is_scaled_by_its_signed_range():
    values = np.array([[-2 ** 31, -1, 0, 2 ** 30, 2 ** 31 - 1]], np.int32)
    image = reopened(Image.fromarray(values), 'TIFF')
    assert image.mode == 'I'
    assert np.array_equal(rgb_of(image), grey((values.astype(np.float64) + 2 ** 31) * 255. / (2 ** 32 - 1)))


def test_I_without_a_recorded_depth_beyond_sixteen_bits_takes_the_thirty_two_bit_range():
    values = np.array([[0, 70000, 2 ** 31 - 1]], np.int32)
    assert np.array_equal(rgb_of(Image.fromarray(values, 'I')),
                          grey((values.astype(np.float64) + 2 ** 31) * 255. / (2 ** 32 - 1)))


@pytest.mark.parametrize('values, low, high', [
    ([[0., 0.25, 0.5, 1.]], 0., 1.),  # the float convention: [0, 1]
    ([[0., 0.5, 100., 255.]], 0., 255.),  # 8-bit levels as floats: scaled down, not clipped
    ([[-2., 0., 1., 5.]], -2., 5.),
])
def test_floating_point_is_scaled_from_zero_one_or_its_wider_range(values, low, high):
    values = np.array(values, np.float32)
    image = reopened(Image.fromarray(values, 'F'), 'TIFF')
    assert image.mode == 'F'
    assert np.array_equal(rgb_of(image), grey((values.astype(np.float64) - low) * 255. / (high - low)))


def test_floating_point_with_nan_is_an_unreadable_image(tmp_path):
    data = make_image_folder(tmp_path / 'data', classes=('a',), per_class=1, splits=('val',))
    Image.fromarray(np.array([[0., np.nan]], np.float32), 'F').save(data / 'val' / 'a' / 'nan.tif')
    dataset = create_split_dataset('', str(data / 'val'), 'validation')
    assert [dataset[i] is None for i in range(len(dataset))] == [False, True]
    assert unreadable_count(dataset) == 1
    with pytest.raises(ValueError, match='NaN or infinite'):
        read_rgb(str(data / 'val' / 'a' / 'nan.tif'))


COLOURS = RNG.integers(0, 256, (3, 4, 3)).astype(np.uint8)
ALPHA = np.array([[0, 1, 127, 128], [200, 254, 255, 0], [64, 255, 30, 90]], np.uint8)


def test_rgba_is_composited_over_white():
    image = Image.fromarray(np.dstack([COLOURS, ALPHA]), 'RGBA')
    assert np.array_equal(rgb_of(image), over_white(COLOURS, ALPHA))


def test_grey_with_alpha_is_composited_over_white():
    image = reopened(Image.fromarray(np.dstack([COLOURS[..., 0], ALPHA]), 'LA'), 'PNG')
    assert image.mode == 'LA'
    assert np.array_equal(rgb_of(image), over_white(np.repeat(COLOURS[..., :1], 3, -1), ALPHA))


@pytest.mark.parametrize('mode', ['RGBa', 'La'])
def test_premultiplied_alpha_is_composited_over_white(mode):
    channels = 3 if mode == 'RGBa' else 1
    premultiplied = np.round(COLOURS[..., :channels] * (ALPHA[..., None] / 255.)).astype(np.uint8)
    image = Image.frombytes(mode, (4, 3), np.dstack([premultiplied, ALPHA]).tobytes())
    expected = premultiplied.astype(np.int64) + (255 - ALPHA[..., None].astype(np.int64))
    assert np.array_equal(rgb_of(image), np.broadcast_to(expected, (3, 4, 3)))


def test_palette_with_transparent_entries_is_composited_over_white():
    palette = RNG.integers(0, 256, (4, 3)).astype(np.uint8)
    alphas = np.array([0, 100, 255, 30], np.uint8)
    indices = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)
    image = Image.fromarray(indices, 'P')
    image.putpalette(palette.ravel().tolist())
    image.info['transparency'] = alphas.tobytes()
    image = reopened(image, 'PNG')
    assert image.mode == 'P' and 'transparency' in image.info
    assert np.array_equal(rgb_of(image), over_white(palette[indices], alphas[indices]))


def test_palette_with_alpha_PA_is_composited_over_white():
    palette = RNG.integers(0, 256, (4, 3)).astype(np.uint8)
    indices = np.array([[0, 1], [2, 3]], np.uint8)
    alpha = np.array([[0, 50], [255, 128]], np.uint8)
    image = Image.frombytes('PA', (2, 2), np.dstack([indices, alpha]).tobytes())
    image.putpalette(palette.ravel().tolist())
    assert np.array_equal(rgb_of(image), over_white(palette[indices], alpha))


@pytest.mark.parametrize('mode', ['L', 'RGB'])
def test_a_transparent_colour_is_white(mode):
    values = np.array([[10, 20], [30, 10]], np.uint8)
    image = Image.fromarray(values if mode == 'L' else np.dstack([values] * 3), mode)
    image.info['transparency'] = 10 if mode == 'L' else (10, 10, 10)
    image = reopened(image, 'PNG')
    assert 'transparency' in image.info
    expected = np.where(values == 10, 255, values)
    assert np.array_equal(rgb_of(image), grey(expected))


def test_a_transparent_value_of_sixteen_bit_grey_is_white():
    image = Image.fromarray(UINT16)
    image.info['transparency'] = 1000
    image = reopened(image, 'PNG')
    assert np.array_equal(rgb_of(image), grey(np.where(UINT16 == 1000, 255, UINT16 / 257.)))


def test_cmyk_is_converted_without_a_profile():
    cmyk = RNG.integers(0, 256, (3, 5, 4)).astype(np.uint8)
    image = reopened(Image.fromarray(cmyk, 'CMYK'), 'JPEG')  # Pillow writes and reads Adobe's inverted CMYK
    values = np.asarray(image).astype(np.float64)
    expected = nearest((255. - values[..., :3]) * (255. - values[..., 3:]) / 255.)
    assert np.array_equal(rgb_of(image), expected)


def test_ycbcr_is_converted_as_jpeg_defines_it():
    ycc = RNG.integers(0, 256, (3, 5, 3)).astype(np.float64)
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128., ycc[..., 2] - 128.
    expected = np.clip(nearest(np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)),
                       0, 255)
    difference = np.abs(rgb_of(Image.fromarray(ycc.astype(np.uint8), 'YCbCr')) - expected)
    assert difference.max() <= 1  # Pillow's fixed-point arithmetic


def test_hsv_is_converted_to_its_colours():
    hsv = np.array([[[0, 255, 255], [85, 255, 128], [170, 255, 255], [0, 0, 77]]], np.uint8)
    expected = np.array([[[255, 0, 0], [0, 128, 0], [0, 0, 255], [77, 77, 77]]])
    assert np.abs(rgb_of(Image.fromarray(hsv, 'HSV')) - expected).max() <= 1


def test_lab_is_converted_through_cie_xyz():
    """Pillow's LAB keeps L as 0..255 for 0..100 and a, b as signed bytes."""
    lab = np.array([[[0, 0, 0], [128, 0, 0], [255, 0, 0], [140, 72, 52], [100, -60, -38]]], np.int16).astype(np.uint8)
    lightness = lab[..., 0] * 100. / 255.
    a, b = (lab[..., i].view(np.int8).astype(np.float64) for i in (1, 2))
    fy = (lightness + 16.) / 116.
    f = np.stack([fy + a / 500., fy, fy - b / 200.], -1)
    xyz_d50 = np.where(f > 6. / 29., f ** 3, 3 * (6. / 29.) ** 2 * (f - 4. / 29.)) * np.array([0.9642, 1., 0.8249])
    d50_to_linear_srgb = np.array([[3.1339, -1.6169, -0.4906], [-0.9788, 1.9161, 0.0335], [0.0719, -0.2290, 1.4052]])
    linear = np.clip(xyz_d50 @ d50_to_linear_srgb.T, 0., 1.)
    srgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055) * 255.
    assert np.abs(rgb_of(Image.fromarray(lab, 'LAB')) - nearest(srgb)).max() <= 2  # LittleCMS's tables


def test_bilevel_palette_grey_and_rgbx_are_their_levels():
    bits = np.array([[True, False], [False, True]])
    assert np.array_equal(rgb_of(Image.fromarray(bits)), grey(bits * 255))
    levels = np.array([[0, 64], [128, 255]], np.uint8)
    assert np.array_equal(rgb_of(Image.fromarray(levels, 'L')), grey(levels))
    palette = RNG.integers(0, 256, (4, 3)).astype(np.uint8)
    image = Image.fromarray(np.array([[0, 1], [2, 3]], np.uint8), 'P')
    image.putpalette(palette.ravel().tolist())
    assert np.array_equal(rgb_of(image), palette[np.array([[0, 1], [2, 3]])])
    rgbx = Image.fromarray(np.dstack([COLOURS, ALPHA]), 'RGBA').convert('RGBX')
    assert np.array_equal(rgb_of(rgbx), COLOURS)


def test_the_dataset_reads_sixteen_bit_pngs_scaled(tmp_path):
    data = make_image_folder(tmp_path / 'data', classes=('a',), per_class=1, splits=('val',))
    Image.fromarray(UINT16).save(data / 'val' / 'a' / 'depth.png')
    dataset = create_split_dataset('', str(data / 'val'), 'validation')
    image, label = dataset[[path for path, _ in dataset.reader.samples].index(str(data / 'val' / 'a' / 'depth.png'))]
    assert label == 0 and np.array_equal(np.asarray(image).astype(np.int64), grey(UINT16 / 257.))
