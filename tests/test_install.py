"""`pip install -e .` installs the models and utils packages, so the README's notebook snippet runs from any
folder."""
import shutil
import subprocess
import sys

from conftest import ROOT, TINY_KWARGS

SNIPPET = f'''
import timm
import torch
import models  # registers posmlp_* with timm

model = timm.create_model('posmlp_t', num_classes=10, **{TINY_KWARGS!r})
assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
assert 'posmlp_t' in timm.list_models('posmlp*')
from utils.args import train_parser
print(models.__file__)
'''


def test_pip_install_editable_makes_the_notebook_snippet_work_from_any_folder(tmp_path):
    source = tmp_path / 'clone'
    source.mkdir()
    for name in ('pyproject.toml', 'requirements.txt', 'README.md', 'LICENSE'):
        shutil.copy(ROOT / name, source)
    for package in ('models', 'utils'):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns('__pycache__'))
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', '--without-pip', str(venv)], check=True)
    python = venv / 'bin' / 'python'
    # Offline: the build backend and the dependencies are this interpreter's.
    install = subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '--no-build-isolation',
                              '--no-deps', '--no-index', '-e', str(source)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]

    elsewhere = tmp_path / 'notebooks'
    elsewhere.mkdir()
    run = subprocess.run([str(python), '-c', SNIPPET], cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == str(source / 'models' / '__init__.py')
