"""The README's commands for inference, weights files, Hub folders and ONNX, run as written on a quickstart-like run.

The run folder is made without training (tests/test_quickstart.py trains the real one): checkpoints of the
quickstart's model and class map at output/quickstart/, and a few digit-class images at data/digits/val/.
"""
import re
import shlex
import shutil

import numpy as np
import onnxruntime
import pytest
import torch
import yaml

from conftest import ROOT, make_image_folder
from tool_helpers import write_checkpoint

import avg_checkpoints
import clean_checkpoint
import export_hub
import inference
import models
import onnx_export
import validate

pytestmark = pytest.mark.usefixtures('in_process_run')
SECTIONS = ('Inference', 'Weights files: clean, average, safetensors', 'Hub folders', 'ONNX')
SCRIPTS = {'inference.py': inference, 'clean_checkpoint.py': clean_checkpoint, 'avg_checkpoints.py': avg_checkpoints,
           'export_hub.py': export_hub, 'onnx_export.py': onnx_export}


def readme_blocks(section: str, language: str) -> list:
    text = (ROOT / 'README.md').read_text()
    body = text.split(f'\n## {section}\n', 1)[1].split('\n## ', 1)[0]
    return re.findall(rf'```{language}\n(.*?)```', body, re.S)


def quickstart_like_run(root):
    config = yaml.safe_load((ROOT / 'configs' / 'quickstart.yaml').read_text())
    kwargs = dict(config['model_kwargs'], img_size=config['img_size'])
    digits = {str(d): d for d in range(10)}
    run = root / 'output' / 'quickstart'
    run.mkdir(parents=True)
    for epoch, metric in ((5, 90.), (6, 95.), (7, 93.)):
        write_checkpoint(run / f'checkpoint-{epoch}.pth.tar', epoch, metric, seed=epoch, ema=False,
                         model_kwargs=kwargs, class_to_idx=digits)
    shutil.copy(run / 'checkpoint-6.pth.tar', run / 'model_best.pth.tar')
    shutil.copy(run / 'checkpoint-7.pth.tar', run / 'last.pth.tar')
    make_image_folder(root / 'data' / 'digits', classes=tuple(digits), per_class=1, splits=('val',))


def run_command(line: str) -> int:
    words = shlex.split(line)
    if words[:2] == ['bash', 'eval.sh']:
        return validate.main([words[2], '--checkpoint', words[3], '-j', '0', *words[4:]])
    assert words[0] == 'python' and words[1] in SCRIPTS, line
    return SCRIPTS[words[1]].main(words[2:])


def test_every_tool_command_of_the_readme_runs_on_the_quickstart_checkpoint(tmp_path, monkeypatch):
    quickstart_like_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    commands = [line for section in SECTIONS for block in readme_blocks(section, 'bash')
                for line in block.replace('\\\n', ' ').splitlines() if line.strip()]
    assert len(commands) == 6
    for line in commands:
        assert run_command(line) == 0, line
    run = tmp_path / 'output' / 'quickstart'
    assert (run / 'predictions' / 'posmlp_t-32.csv').is_file() and (run / 'predictions' / 'posmlp_t-32.json').is_file()
    assert len(list(run.glob('posmlp_quickstart-*.safetensors'))) == 1 and (run / 'averaged.pth').is_file()
    assert (run / 'hub' / 'model.safetensors').is_file()

    for section in SECTIONS:  # the Python examples, with what the commands wrote
        for block in readme_blocks(section, 'python'):
            exec(compile(block, f'README.md ({section})', 'exec'), {})

    # The torch.export graph (the default exporter) runs as PyTorch does, at another batch size.
    session = onnxruntime.InferenceSession(str(run / 'posmlp_quickstart.onnx'), providers=['CPUExecutionProvider'])
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = models.create_model_from_checkpoint(str(run / 'model_best.pth.tar')).eval()(images).numpy()
    got = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
