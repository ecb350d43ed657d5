"""Results files: tables of rows as .csv, .json or .parquet, replaced whole or not at all.

validate.py and benchmark.py write rows of measurements with the command, machine and versions they came
from (`write_results`); inference.py writes a table of predictions in timm's layouts with `csv_text` and
`write_parquet`; the ablation writes its results.csv with `write_results` too.
"""
import contextlib
import csv
import datetime
import io
import json
import os
import platform
import shlex
from typing import Dict, List, Optional, Sequence

import timm
import torch

from models.checkpoint import atomic_file
from .outputs import write_atomically

RESULT_FORMATS = ('csv', 'json')
TABLE_FORMATS = RESULT_FORMATS + ('parquet',)  # inference.py's predictions (parquet needs pyarrow)
# Environment variables that change speed without showing in the command: allocators, thread pools, math
# modes, compilers, devices, and where imported code comes from.
TIMING_ENV_PREFIXES = (
    'MALLOC_', 'LD_PRELOAD', 'OMP_', 'MKL_', 'KMP_', 'PYTORCH_', 'TORCH', 'NVIDIA_TF32_OVERRIDE', 'CUBLAS_',
    'CUDNN_', 'CUDA_', 'NCCL_', 'PYTHONPATH',
)


def results_format(path: str, requested: Optional[str] = None,
                   formats: Sequence[str] = RESULT_FORMATS) -> Optional[str]:
    """The format to write `path` in: `requested`, else the one of `formats` its suffix names; None when neither
    does."""
    suffix = os.path.splitext(path)[1].lstrip('.').lower()
    return requested or (suffix if suffix in formats else None)


def command_line(script: str, argv: Sequence[str]) -> str:
    return shlex.join(['python3', script, *argv])


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as cpuinfo:
            for line in cpuinfo:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()


def run_environment(command: str, device: torch.device) -> Dict[str, object]:
    """What a reader of a results file needs to know how and where it was measured."""
    return dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        command=command,
        device=str(device),
        device_name=device_name(device),
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
        timm=timm.__version__,
        env_vars={k: v for k, v in sorted(os.environ.items()) if k.startswith(TIMING_ENV_PREFIXES)},
    )


def _csv_cell(value: object) -> object:
    """Lists as space-separated values, mappings as JSON, so that every row is one line of plain cells."""
    if isinstance(value, (list, tuple)):
        return ' '.join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, default=repr)
    return value


def csv_text(rows: List[Dict[str, object]]) -> str:
    """One line per row under a header of every column the rows have, in order of appearance; a cell that is a
    list holds its values separated by spaces, a mapping its JSON, so that every row is one line of plain cells."""
    buffer = io.StringIO(newline='')
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
    writer.writeheader()
    writer.writerows({k: _csv_cell(v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def write_results(path: str, rows: List[Dict[str, object]], environment: Dict[str, object],
                  fmt: Optional[str] = None):
    """JSON: {"environment": ..., "results": [rows]}. CSV: one line per row, the environment's columns in
    every line. The file is replaced whole, so a crash leaves the old file or the new one."""
    if (fmt or results_format(path)) == 'json':
        text = json.dumps(dict(environment=environment, results=rows), indent=2, default=repr) + '\n'
    else:
        text = csv_text([dict(row, **environment) for row in rows])
    write_atomically(path, text)


def write_parquet(path: str, columns: Dict[str, list]):
    """A table of {column: values} as parquet (pyarrow), replaced whole as the other formats are."""
    import pyarrow
    import pyarrow.parquet
    with atomic_file(path) as f:
        pyarrow.parquet.write_table(pyarrow.table(columns), f)


def format_table(lines: List[List[str]]) -> str:
    """Cells in left-aligned columns, the first line the header."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return '\n'.join('  '.join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)
