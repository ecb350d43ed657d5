"""onnx_export.py: graphs that onnxruntime runs to PyTorch's logits within 1e-4, at any batch size."""
import errno
import os

import numpy as np
import onnxruntime
import pytest
import torch

from conftest import TINY_MODEL_ARGS
from tool_helpers import write_checkpoint

import models
import onnx_export

pytestmark = pytest.mark.usefixtures('in_process_run')


def onnx_logits(path, images: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]


def torch_logits(model, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(images).numpy()


def test_a_posmlp_checkpoint_runs_in_onnxruntime_as_in_pytorch(tmp_path, capsys):
    """The TorchScript exporter; tests/test_readme_tools.py checks the default (torch.export) one alike."""
    write_checkpoint(tmp_path / 'best.pth.tar')
    out = tmp_path / 'onnx' / 'posmlp.onnx'
    assert onnx_export.main([str(out), '--checkpoint', str(tmp_path / 'best.pth.tar'), '--reparam', '--check-forward',
                             '--no-dynamo']) == 0
    assert '--check-forward: onnxruntime matches PyTorch on 3 images' in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ['posmlp.onnx']
    images = torch.randn(5, 3, 32, 32)  # another batch size than the export's 2
    expected = torch_logits(models.create_model_from_checkpoint(str(tmp_path / 'best.pth.tar')), images)
    np.testing.assert_allclose(onnx_logits(out, images), expected, rtol=0, atol=1e-4)


def test_a_timm_model_exports_from_its_checkpoint(tmp_path):
    write_checkpoint(tmp_path / 'resmlp.pth.tar', model_name='resmlp_12_224', model_kwargs=dict(img_size=32))
    out = tmp_path / 'resmlp.onnx'
    assert onnx_export.main([str(out), '--checkpoint', str(tmp_path / 'resmlp.pth.tar'), '--no-dynamo']) == 0
    images = torch.randn(3, 3, 32, 32)
    expected = torch_logits(models.create_model_from_checkpoint(str(tmp_path / 'resmlp.pth.tar')), images)
    np.testing.assert_allclose(onnx_logits(out, images), expected, rtol=0, atol=1e-4)


def test_dynamic_size_takes_other_sizes_that_fit_the_windows(tmp_path):
    write_checkpoint(tmp_path / 'best.pth.tar')
    out = tmp_path / 'posmlp.onnx'
    assert onnx_export.main([str(out), '--checkpoint', str(tmp_path / 'best.pth.tar'), '--dynamic-size',
                             '--no-dynamo']) == 0
    images = torch.randn(1, 3, 64, 64)
    expected = torch_logits(models.create_model_from_checkpoint(str(tmp_path / 'best.pth.tar')), images)
    np.testing.assert_allclose(onnx_logits(out, images), expected, rtol=0, atol=1e-4)


def test_a_failed_check_or_a_taken_name_leaves_no_file(tmp_path, capsys):
    model = ['--model', 'posmlp_t', *TINY_MODEL_ARGS, '--num-classes', '4', '--no-dynamo']
    out = tmp_path / 'm.onnx'
    assert onnx_export.main([str(out), *model, '--check-forward', '--check-atol', '-1']) == 1
    log = capsys.readouterr().out
    assert 'random weights' in log and 'more than --check-atol -1; the graph is not the model' in log
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b'mine')
    assert onnx_export.main([str(out), *model]) == 1
    assert 'already exists' in capsys.readouterr().out and out.read_bytes() == b'mine'


def test_bad_options_are_named(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        onnx_export.main([str(tmp_path / 'm.onnx')])
    assert 'give --checkpoint (its model is exported) or --model' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        onnx_export.main([str(tmp_path / 'm.onnx'), '--model', 'posmlp_tt'])
    assert 'no such model; did you mean posmlp_t' in capsys.readouterr().err
    monkeypatch.setattr(onnx_export, '_importable', lambda name: name != 'onnxruntime')
    with pytest.raises(SystemExit):
        onnx_export.main([str(tmp_path / 'm.onnx'), '--model', 'posmlp_t', '--model-kwargs', f'img_size={32}'])
    assert 'needs onnxruntime: pip install onnxruntime' in capsys.readouterr().err


def test_the_opset_ranges_are_the_installed_torchs():
    # onnx_export.py writes them out rather than import torch's private modules; a torch that moves them fails here.
    from torch.onnx._constants import ONNX_MAX_OPSET, ONNX_MIN_OPSET, ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    from torch.onnx._internal.exporter._constants import TORCHLIB_OPSET
    assert onnx_export.OPSETS == {True: (TORCHLIB_OPSET, ONNX_MAX_OPSET),
                                  False: (ONNX_MIN_OPSET, ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)}


@pytest.mark.parametrize('options, message', [
    (['--opset', '13', '--dynamo'], '--opset 13: the torch.export exporter writes opsets 18 to '),
    (['--opset', '30', '--no-dynamo'], '--opset 30: the TorchScript exporter writes opsets 7 to 20'),
])
def test_an_opset_the_exporter_cannot_write_is_refused_up_front(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit):
        onnx_export.main([str(tmp_path / 'm.onnx'), '--model', 'posmlp_t', *TINY_MODEL_ARGS, *options])
    error = capsys.readouterr().err
    assert message in error and ('--no-dynamo for opsets 7 to 20' in error or '--dynamo for opsets 18 to' in error)
    assert list(tmp_path.iterdir()) == []


def test_an_export_that_cannot_be_written_is_an_output_error(tmp_path, capsys, monkeypatch):
    import timm.utils.onnx

    def full_disk(*args, **kwargs):  # as an exporter reports a failed write: its own error, raised from the OSError
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            raise RuntimeError('failed to save the model') from e

    monkeypatch.setattr(timm.utils.onnx, 'onnx_export', full_disk)
    out = tmp_path / 'm.onnx'
    assert onnx_export.main([str(out), '--model', 'posmlp_t', *TINY_MODEL_ARGS, '--no-dynamo']) == 1
    text = capsys.readouterr().out
    assert f'Stopped: cannot write {out}: No space left on device; free space on that disk, or point ONNX_FILE at ' \
           f'another.' in text and 'exporter failed' not in text and 'Traceback' not in text
    assert list(tmp_path.iterdir()) == []
