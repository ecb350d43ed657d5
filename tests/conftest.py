"""Shared test setup: the repository root on sys.path, the authors' reference fixtures, small image folders.

The suite runs whole on a CPU: a skipped test fails the session (see `pytest_sessionfinish`), except one
skipped because it needs CUDA, so a missing fixture or package can never pass unnoticed.
"""
import contextlib
import errno
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Made by each model's authors' code (see tests/fixtures/README.md): the ground truth of the equivalence tests.
FIXTURES = ROOT / 'tests' / 'fixtures'
# Skips that are allowed: the test needs a GPU this machine lacks.
CUDA_SKIP_PREFIX = 'needs CUDA'

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# A small PosMLP for fast tests: four stages, 32 px input -> maps 8, 4, 2, 1 with windows 4, 2, 2, 1.
TINY_KWARGS = dict(
    img_size=32, embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 1), mlp_ratio=(2, 2, 2, 2),
    gamma=(2, 2, 4, 4), win_size=(4, 2, 2, 1),
)


def reference_path(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f'reference fixture {path} is missing: the equivalence tests need every file of tests/fixtures/.')
    return path


_skipped = []


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if CUDA_SKIP_PREFIX not in reason:
            _skipped.append(f'{report.nodeid}: {reason}')


def pytest_sessionfinish(session, exitstatus):
    if _skipped and exitstatus == 0:
        session.exitstatus = 1
        lines = '\n  '.join(_skipped)
        print(f'\nFAILED: {len(_skipped)} test(s) skipped; every test must run here (only "{CUDA_SKIP_PREFIX}" '
              f'skips are allowed):\n  {lines}')


def make_image_folder(root: Path, classes=('a', 'b', 'c'), per_class=6, size=32, seed=0,
                      splits=('train', 'val')) -> Path:
    """ImageFolder splits of small PNGs; each class has its own colour so a model can learn it."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split in splits:
        for ci, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.zeros((size, size, 3), np.float32)
                base[..., ci % 3] = 200
                img = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f'{cls}_{i}.png')
    return root


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / 'data')


# TINY_KWARGS as train.py / validate.py options.
TINY_MODEL_ARGS = ['--model-kwargs', *[f'{k}={v!r}' for k, v in TINY_KWARGS.items()]]


def script_env(**extra) -> dict:
    """Environment for the shell scripts: this interpreter, and a free port for torchrun's rendezvous."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    return dict(os.environ, PYTHON=sys.executable, MASTER_PORT=str(port), **extra)


@contextlib.contextmanager
def restored_process_state(threads: int = 1):
    """Run train.main()/validate.main() in this process: they set the root logger and torch's thread count
    for their run, and both are put back afterwards. One thread, because on two busy cores splitting the
    tiny models' operations over threads is many times slower."""
    import logging
    root = logging.getLogger()
    handlers, level, previous = root.handlers[:], root.level, torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        torch.set_num_threads(previous)


@pytest.fixture
def in_process_run():
    with restored_process_state():
        yield


def refuse_under(monkeypatch, folder, call: str = 'open', code: int = errno.EROFS):
    """Make os.`call` (open, mkdir, makedirs) fail with `code` for paths under `folder`, as a read-only file
    system (EROFS) or a folder one may not write to (EACCES) does."""
    real = getattr(os, call)

    def refusing(path, *args, **kwargs):
        if str(path).startswith(str(folder)):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(os, call, refusing)
