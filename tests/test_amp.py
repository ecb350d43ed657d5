"""--apex-amp with fake apex packages (apex cannot be installed here), its fallback to native AMP, and resuming a
checkpoint across kinds of AMP: apex, native float16 (a loss scaler), none."""
import logging
import sys
import textwrap

import pytest
import timm
import timm.utils.cuda
import torch
from timm.utils import ApexScaler, NativeScaler

from conftest import TINY_KWARGS

from utils.amp import resolve_precision
from utils.run_checkpoints import CheckpointKeeper, resume_training, training_state

CUDA = torch.device('cuda')  # resolve_precision only reads its type; nothing here runs on it

# apex.amp as far as this project and timm's ApexScaler use it; the state and the refusal of another kind's
# state (a RuntimeError naming the unexpected keys) are apex's.
FAKE_AMP = '''
import contextlib
calls = []
state = {'loss_scaler0': {'loss_scale': 65536.0, 'unskipped': 0}}

def initialize(model, optimizer, opt_level):
    calls.append(opt_level)
    return model, optimizer

@contextlib.contextmanager
def scale_loss(loss, optimizer):
    yield loss

def master_params(optimizer):
    return [p for group in optimizer.param_groups for p in group['params']]

def state_dict():
    return {key: dict(value) for key, value in state.items()}

def load_state_dict(loaded):
    unexpected = [key for key in loaded if 'loss_scaler' not in key]
    if unexpected:
        raise RuntimeError(f'Error(s) in loading state_dict. Unexpected key(s) in state_dict: {unexpected}.')
    state.clear()
    state.update(loaded)
'''
APEX_VARIANTS = {
    'working': {'__init__.py': '', 'amp.py': FAKE_AMP},
    'without_amp': {'__init__.py': ''},  # current apex releases
    'broken_amp': {'__init__.py': '', 'amp.py': 'raise RuntimeError("apex was built for another CUDA")'},
    'broken': {'__init__.py': 'raise OSError("libcudart.so.11: cannot open shared object file")'},
}


@pytest.fixture
def fake_apex(tmp_path, monkeypatch):
    """Put a fake `apex` package on sys.path; returns its `apex.amp` module (None when it has none)."""
    def install(variant: str):
        root = tmp_path / variant
        (root / 'apex').mkdir(parents=True)
        for name, text in APEX_VARIANTS[variant].items():
            (root / 'apex' / name).write_text(textwrap.dedent(text))
        monkeypatch.syspath_prepend(str(root))
        for name in [n for n in sys.modules if n == 'apex' or n.startswith('apex.')]:
            monkeypatch.delitem(sys.modules, name)
        if variant != 'working':
            return None
        import apex.amp
        monkeypatch.setattr(timm.utils.cuda, 'amp', apex.amp)  # the module timm's ApexScaler calls
        return apex.amp
    yield install
    for name in [n for n in sys.modules if n == 'apex' or n.startswith('apex.')]:
        del sys.modules[name]


def tiny_model(gate: str = 'lrpe'):
    model = timm.create_model('posmlp_t', num_classes=3, gate=gate, **TINY_KWARGS)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def test_apex_amp_initializes_o1_once_for_a_model_without_gqpe(fake_apex, caplog):
    amp = fake_apex('working')
    model, optimizer = tiny_model('lrpe')
    model_out, optimizer_out, precision = resolve_precision(CUDA, apex=True, model=model, optimizer=optimizer)
    assert amp.calls == ['O1'] and model_out is model and optimizer_out is optimizer
    assert isinstance(precision.loss_scaler, ApexScaler) and precision.description == 'NVIDIA apex AMP (O1)'
    assert 'WARNING' not in caplog.text


@pytest.mark.filterwarnings('ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available')
@pytest.mark.parametrize('variant, device, gate, reason', [
    (None, CUDA, 'lrpe', '--apex-amp: NVIDIA apex is not installed; using native torch AMP (float16) instead.'),
    ('without_amp', CUDA, 'lrpe', "NVIDIA apex has no usable apex.amp (current apex releases have none): "
                                  "ImportError: cannot import name 'amp' from 'apex'"),
    ('broken_amp', CUDA, 'lrpe', 'has no usable apex.amp (current apex releases have none): RuntimeError: apex was '
                                 'built for another CUDA; using native torch AMP (float16) instead.'),
    ('broken', CUDA, 'lrpe', 'OSError: libcudart.so.11: cannot open shared object file; using native torch AMP'),
    ('working', torch.device('cpu'), 'lrpe', '--apex-amp: NVIDIA apex needs CUDA; using native torch AMP (bfloat16)'),
    ('working', CUDA, 'gqpe', "--apex-amp: NVIDIA apex O1 would make GQPE's positional maps in float16"),
])
def test_apex_amp_falls_back_to_native_amp_with_one_warning(fake_apex, caplog, variant, device, gate, reason):
    amp = fake_apex(variant) if variant else None
    model, optimizer = tiny_model(gate)
    _, _, precision = resolve_precision(device, apex=True, model=model, optimizer=optimizer)
    assert precision.description.startswith('native AMP')
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and reason in warnings[0], warnings
    assert amp is None or amp.calls == []


def test_apex_amp_trains_a_step_through_timms_apex_scaler(fake_apex):
    fake_apex('working')
    model, optimizer = tiny_model('lrpe')
    _, _, precision = resolve_precision(CUDA, apex=True, model=model, optimizer=optimizer)
    before = model.head.weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
    precision.loss_scaler(loss, optimizer, clip_grad=1.0, parameters=model.parameters())
    assert not torch.equal(before, model.head.weight)


def scaler_of(kind: str, amp_module):
    if kind == 'apex':
        amp_module.state['loss_scaler0'] = {'loss_scale': 1024.0, 'unskipped': 7}
        return ApexScaler()
    if kind == 'native':
        scaler = NativeScaler(device='cpu')
        scaler.load_state_dict(torch.amp.GradScaler('cpu', init_scale=512.0).state_dict())
        return scaler
    return None


KINDS = ('apex', 'native', 'none')


@pytest.mark.parametrize('saved', KINDS)
@pytest.mark.parametrize('resumed', KINDS)
def test_a_checkpoint_resumes_across_kinds_of_amp(fake_apex, tmp_path, caplog, saved, resumed):
    amp = fake_apex('working')
    model, optimizer = tiny_model()
    CheckpointKeeper(str(tmp_path)).save(training_state(
        0, 'posmlp_t', dict(TINY_KWARGS, num_classes=3, gate='lrpe'), model, optimizer, None,
        scaler_of(saved, amp), None, {}, 50.))
    amp.state.clear()  # a new process: apex's state is its own again
    amp.state['loss_scaler0'] = {'loss_scale': 65536.0, 'unskipped': 0}
    scaler = None if resumed == 'none' else ApexScaler() if resumed == 'apex' else NativeScaler(device='cpu')
    fresh_model, fresh_optimizer = tiny_model()
    assert resume_training(str(tmp_path / 'last.pth.tar'), fresh_model, fresh_optimizer, None, scaler) == 1
    assert torch.equal(fresh_model.head.weight, model.head.weight)

    if resumed == 'apex':
        restored = amp.state['loss_scaler0']['loss_scale']
    elif resumed == 'native':
        restored = scaler.state_dict()['scale']
    if resumed == 'none' or saved == resumed:
        assert resumed == 'none' or restored == {'apex': 1024.0, 'native': 512.0}[saved]
    else:
        assert restored == 65536.0  # a fresh scaler
        other = {'apex': 'NVIDIA apex', 'native': 'native float16 AMP', 'none': ''}
        message = (f'holds the loss-scaler state of {other[saved]}, and this run uses {other[resumed]}: the scaler '
                   f'starts fresh' if saved != 'none' else 'has no loss-scaler state')
        assert message in caplog.text
    if saved != 'none' and resumed == 'none':
        assert 'holds loss-scaler state (the run used float16 AMP or apex)' in caplog.text
