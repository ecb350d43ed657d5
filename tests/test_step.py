"""The training step on CPU: no value read off the device between forward and backward, the non-finite loss
check that every process agrees on, DDP's buffer broadcasting, --torchcompile's mode, TF32 and cuDNN settings."""
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from timm.utils import NativeScaler

from conftest import ROOT, TINY_MODEL_ARGS, make_image_folder, script_env

import train
import validate
from utils import amp, engine, recipe
from utils.args import parse_train_args
from utils.distributed import Runtime
from utils.errors import NonFiniteLossError

CPU = Runtime(torch.device('cpu'))


class HostReads(TorchDispatchMode):
    """Records, in `events`, every read of a tensor's value by the host: `.item()`, `float()`, `bool()`
    (aten's _local_scalar_dense), and `.tolist()`/`.numpy()`/`.cpu()`, which the dispatcher does not see.
    On a GPU each of them waits for the device."""

    def __init__(self, events: list, monkeypatch):
        super().__init__()
        self.events = events
        for name in ('tolist', 'numpy', 'cpu'):
            monkeypatch.setattr(torch.Tensor, name, self._recording(getattr(torch.Tensor, name)))

    def _recording(self, method):
        def recorded(tensor, *args, **kwargs):
            self.events.append('read')
            return method(tensor, *args, **kwargs)
        return recorded

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.events.append('read')
        return func(*args, **(kwargs or {}))


class MarkedLoss(torch.nn.Module):
    """Cross entropy that marks, in `events`, where each backward starts; `poison` maps a call number (from 1)
    to a value added to the loss (NaN: the loss is NaN, its gradient is not)."""

    def __init__(self, events: list, poison: dict = None):
        super().__init__()
        self.events, self.poison, self.calls = events, poison or {}, 0

    def forward(self, logits, targets):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(logits, targets) + self.poison.get(self.calls, 0.)
        loss.register_hook(lambda grad: self.events.append('backward'))
        return loss


def tiny_loader(batches: int, batch_size: int = 2):
    images, targets = torch.randn(batches * batch_size, 4), torch.arange(batches * batch_size) % 2
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, targets), batch_size=batch_size)


def run_epoch(steps: int, events: list, loss_scaler=None, poison=None, log_interval: int = 100, accum: int = 1):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    model.register_forward_pre_hook(lambda module, inputs: events.append('forward'))
    settings = engine.TrainSettings(steps=steps, log_interval=log_interval, loss_scaler=loss_scaler,
                                    grad_accum_steps=accum, clip_grad=1.0)
    return engine.train_one_epoch(0, model, tiny_loader(steps), torch.optim.SGD(model.parameters(), lr=0.1),
                                  MarkedLoss(events, poison), CPU, settings)


@pytest.mark.parametrize('scaler', [None, 'native'])
def test_no_value_is_read_off_the_device_between_forward_and_backward(monkeypatch, scaler):
    events = []
    loss_scaler = NativeScaler(device='cpu') if scaler else None
    with HostReads(events, monkeypatch):
        run_epoch(6, events, loss_scaler, accum=2)
    assert events.count('forward') == events.count('backward') == 6
    steps = ''.join({'forward': 'F', 'backward': 'B', 'read': 'r'}[e] for e in events).split('F')[1:]
    assert all(not step.startswith('r') for step in steps), steps  # each step's reads all come after its backward


def test_the_losses_are_read_at_the_log_interval_not_every_step(monkeypatch):
    counts = []
    for steps in (3, 9):
        events = []
        with HostReads(events, monkeypatch):
            metrics, _ = run_epoch(steps, events, log_interval=100)
        counts.append(events.count('read'))
    # The first and the last step are logged; the reads do not grow with the steps between.
    assert counts[0] == counts[1] and counts[0] > 0
    assert math.isfinite(metrics['loss'])


def test_a_non_finite_loss_stops_at_the_next_check_naming_the_steps_since_the_last_one():
    events = []
    with pytest.raises(NonFiniteLossError) as error:
        run_epoch(8, events, poison={4: float('nan')}, log_interval=4)
    # Checked after steps 1, 5 and 8: the NaN of step 4 is found at step 5, and nothing after it runs.
    assert 'the loss became nan in epoch 0, at one of steps 2-5 (those since the last check) of 8' in str(error.value)
    assert 'updates up to step 5 may have been applied' in str(error.value)
    assert events.count('forward') == 5

    with pytest.raises(NonFiniteLossError, match=r'became inf in epoch 0, at one of steps 6-8 \('):
        run_epoch(8, [], poison={8: float('inf')}, log_interval=4)
    with pytest.raises(NonFiniteLossError, match='became inf in epoch 0, at step 3 of 8, on at least one'):
        run_epoch(8, [], poison={3: float('inf')}, log_interval=1)


def test_the_epoch_loss_is_the_mean_over_samples_as_before():
    events = []
    metrics, updates = run_epoch(5, events, log_interval=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = []
    for images, targets in tiny_loader(5):
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        expected.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    assert updates == 5 and metrics['loss'] == pytest.approx(sum(expected) / 5, rel=1e-6)


INJECT = '''
import os, sys
sys.path.insert(0, {root!r})
import torch
import train

# The loss of one step on one process is NaN; its gradient is not, so the other processes' losses and every
# process's weights stay finite: only the agreed check can stop the others.
NAN_RANK, NAN_CALL = int(os.environ['NAN_RANK']), int(os.environ['NAN_CALL'])


class Poisoned(torch.nn.Module):
    def __init__(self, loss_fn):
        super().__init__()
        self.loss_fn, self.calls = loss_fn, 0

    def forward(self, logits, targets):
        self.calls += 1
        loss = self.loss_fn(logits, targets)
        if self.calls == NAN_CALL and int(os.environ['RANK']) == NAN_RANK:
            loss = loss + float('nan')
        return loss


original = train.training_loss
train.training_loss = lambda args, mixup_active: Poisoned(original(args, mixup_active))
sys.exit(train.main(sys.argv[1:]))
'''


def test_a_nan_on_one_process_stops_every_process_together_and_keeps_the_checkpoints(tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=8)  # 24 images: 3 batches of 4 per process
    script = tmp_path / 'inject.py'
    script.write_text(INJECT.format(root=str(ROOT)))
    run_dir = tmp_path / 'out' / 'nan'
    env = script_env(NAN_RANK='1', NAN_CALL='5')  # epoch 1, its second step
    result = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(script),
         str(data), *TINY_MODEL_ARGS, '-b', '4', '-j', '0', '--threads', '1', '--epochs', '3', '--warmup-epochs', '0',
         '--cooldown-epochs', '0', '--log-interval', '2', '--output', str(tmp_path / 'out'), '--experiment', 'nan'],
        env=env, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    message = 'the loss became nan in epoch 1, at one of steps 2-3 (those since the last check) of 3'
    assert output.count(f'Stopped: {message}') == 2, output[-3000:]  # each process, at the same check
    log = (run_dir / 'train.log').read_text()
    assert message in log and 'broadcast_buffers=False' in log
    last = torch.load(run_dir / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert last['epoch'] == 0 and (run_dir / 'checkpoint-0.pth.tar').exists()
    assert not (run_dir / 'checkpoint-1.pth.tar').exists()
    assert all(torch.isfinite(v).all() for v in last['state_dict'].values() if v.is_floating_point())


@pytest.mark.parametrize('argv, broadcast', [([], False), (['--ddp-bb'], True), (['--no-ddp-bb'], False)])
def test_ddp_broadcasts_buffers_only_with_ddp_bb(tmp_path, argv, broadcast):
    args = parse_train_args(['data', *argv])
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        model = recipe.wrap_ddp(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)), CPU, args)
        assert model.broadcast_buffers is broadcast
    finally:
        dist.destroy_process_group()


def test_dist_bn_off_without_buffer_broadcasting_is_named(tmp_path, caplog):
    args = parse_train_args(['data', '--dist-bn', ''])
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        recipe.wrap_ddp(torch.nn.Linear(2, 2), CPU, args)
    finally:
        dist.destroy_process_group()
    assert "--dist-bn '' without --ddp-bb: each process keeps BatchNorm statistics of its own data" in caplog.text


def test_torchcompile_mode_reaches_torch_compile_in_train_and_validate(tmp_path, monkeypatch, in_process_run):
    compiled, devices = [], []
    monkeypatch.setattr(torch, 'compile', lambda model, **kwargs: compiled.append(kwargs) or model)
    for script in (train, validate):
        monkeypatch.setattr(script, 'use_tf32_and_cudnn_benchmark', devices.append)
    data = make_image_folder(tmp_path / 'data', per_class=2)
    assert train.main([str(data), *TINY_MODEL_ARGS, '-b', '2', '-j', '0', '--epochs', '1', '--max-steps-per-epoch',
                       '1', '--torchcompile', '--torchcompile-mode', 'max-autotune-no-cudagraphs',
                       '--output', str(tmp_path / 'out'), '--experiment', 'compiled']) == 0
    assert validate.main([str(data), '--checkpoint', str(tmp_path / 'out' / 'compiled' / 'last.pth.tar'), '-j', '0',
                          '--torchcompile', 'inductor', '--torchcompile-mode', 'reduce-overhead']) == 0
    assert compiled == [dict(backend='inductor', mode='max-autotune-no-cudagraphs'),
                        dict(backend='inductor', mode='reduce-overhead')]
    assert devices == [torch.device('cpu')] * 2


@pytest.mark.parametrize('argv, message', [
    (['--torchcompile', 'nope'], '--torchcompile nope: no such torch.compile backend; give one of'),
    (['--torchcompile', '--torchcompile-mode', 'fastest'], '--torchcompile-mode fastest: no such mode; give one of'),
    (['--torchcompile-mode', 'max-autotune'], '--torchcompile-mode max-autotune is a mode of the inductor backend'),
    (['--torchcompile', 'eager', '--torchcompile-mode', 'max-autotune'], 'is a mode of the inductor backend'),
])
def test_bad_torchcompile_options_are_named(capsys, argv, message):
    with pytest.raises(SystemExit):
        parse_train_args(['data', *argv])
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        validate.main(['data', '--checkpoint', 'x.pth', *argv])
    assert message in capsys.readouterr().err


def test_tf32_and_cudnn_benchmark_are_set_for_cuda_only(monkeypatch):
    flags = SimpleNamespace(matmul=SimpleNamespace(allow_tf32=False), cudnn=SimpleNamespace(benchmark=False))
    monkeypatch.setattr(torch.backends.cuda, 'matmul', flags.matmul)
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)
    amp.use_tf32_and_cudnn_benchmark(torch.device('cpu'))
    assert not flags.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
    amp.use_tf32_and_cudnn_benchmark(torch.device('cuda'))
    assert flags.matmul.allow_tf32 and torch.backends.cudnn.benchmark


@pytest.mark.parametrize('clip_mode, head_clipped', [('norm', True), ('value', True), ('agc', False)])
def test_adaptive_clipping_leaves_the_head_out_as_timm_does(clip_mode, head_clipped):
    import timm
    from conftest import TINY_KWARGS
    from utils.engine import _clipped_parameters
    model = timm.create_model('posmlp_t', num_classes=3, **TINY_KWARGS)
    clipped = {id(p) for p in _clipped_parameters(model, clip_mode)}
    head = {id(p) for p in model.head.parameters()}
    assert (head <= clipped) == head_clipped and bool(head & clipped) == head_clipped
    assert clipped | head == {id(p) for p in model.parameters()}
