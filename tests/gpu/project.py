"""The project's functions and classes that the GPU check calls, imported in this one place: when one is
renamed or moved, the fix is a line here. Everything else the check does goes through the scripts'
command lines (train.py, validate.py, benchmark.py, distributed_train.sh)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import utils.offline  # noqa: E402,F401  (first: the hub client reads its switches when timm imports it)

import models  # noqa: E402,F401  (registers the project's models with timm)
from utils.recipe import wrap_ddp  # noqa: E402,F401
from utils.amp import resolve_precision  # noqa: E402,F401
from utils.distributed import Runtime  # noqa: E402,F401
from utils.engine import TrainSettings, evaluate, train_one_epoch  # noqa: E402,F401
from utils.loader_benchmark import write_sample_jpegs  # noqa: E402,F401
