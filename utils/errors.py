"""Every error a user can cause, by what it is about. Each message names the problem and the fix in one line,
and the scripts print it as such, without a traceback (`utils.distributed.run_script`).

This module imports nothing of the project, so any module (`models` too) can raise these.
"""


class OptionError(ValueError):
    """Options that cannot work together or with this machine; the message says what to change."""


class DataError(RuntimeError):
    """The data cannot be used as given; the message names the problem and the fix."""


class ClassFolderError(ValueError):
    """A split's folders cannot be labelled as they are; the message names the folders and the fix."""


class TransformError(RuntimeError):
    """A transform failed on a readable image: a bug (of this project or timm), reported with its traceback."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unsafe, or does not fit the model."""


class OutputError(RuntimeError):
    """A file of the run (or a results file) that cannot be written; the message names it, why, and what to do."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class BenchmarkError(Exception):
    """A benchmark task that failed; the message names the task, the problem and the fix."""


class AblationError(RuntimeError):
    """The ablation cannot go on; the message names the problem and the fix."""


class VisualizeError(ValueError):
    """A figure that cannot be drawn from what was given; the message says what to give instead."""
