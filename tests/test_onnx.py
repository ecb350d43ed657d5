"""onnx_export.py: graphs that onnxruntime runs to PyTorch's logits within 1e-4, at any batch size."""
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
