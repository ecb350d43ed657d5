"""The device a process runs on and the process group torchrun sets up (NCCL on GPUs, gloo on CPU)."""
import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Type

import torch
import torch.distributed as dist
from timm.utils.distributed import init_distributed_device_so

from .errors import OptionError


@dataclass
class Runtime:
    """Where this process runs and its place among the processes of a torchrun launch."""
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def default_device() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def device_problem(device: str) -> Optional[str]:
    """Why `--device DEVICE` cannot be used here, or None when it can."""
    try:
        device_type = torch.device(device).type
    except RuntimeError:
        return f'--device {device}: not a device; give cpu, cuda or cuda:N.'
    if device_type == 'cuda' and not torch.cuda.is_available():
        return (f'--device {device} asks for CUDA, but CUDA is not available on this machine; leave --device out '
                f'(or pass --device cpu) to run on the CPU.')
    return None


def init_runtime(device: Optional[str] = None, backend: Optional[str] = None, threads: int = 0) -> Runtime:
    """Pick the device (CUDA when available unless `device` says otherwise) and join torchrun's group.

    Under torchrun (WORLD_SIZE > 1) each process takes the GPU of its local rank; timm chooses the
    backend from the device type: NCCL for CUDA, gloo for CPU. `threads` > 0 sets torch's CPU threads.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    device = device or default_device()
    problem = device_problem(device)
    if problem:
        raise OptionError(problem)
    info = init_distributed_device_so(device=device, dist_backend=backend)
    return Runtime(torch.device(info['device']), info['global_rank'], info['local_rank'], info['world_size'])


def sum_over_processes(values: Sequence, runtime: Runtime) -> list:
    """Element-wise sums over all processes, in float64 so counts stay exact."""
    total = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=runtime.device) for v in values])
    if runtime.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.tolist()


def from_primary(value, runtime: Runtime):
    """Rank 0's `value` on every process: a decision all processes must share, made once where the files are."""
    if runtime.distributed:
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        value = holder[0]
    return value


def barrier(runtime: Runtime):
    if runtime.distributed:
        dist.barrier()


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_script(body: Callable, args, expected_errors: Tuple[Type[Exception], ...], logger: logging.Logger) -> int:
    """Runs a script's body and returns its exit status: 0, or 1 after logging an expected error (bad
    input, named in one line without a traceback). The process group is torn down either way."""
    try:
        body(args)
    except expected_errors as e:
        logger.error(f'Stopped: {e}')
        return 1
    finally:
        shutdown()
    return 0
