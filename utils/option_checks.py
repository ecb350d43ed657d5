"""What option values must be, for every script: numbers within bounds, and model names timm knows.

Bounds are argparse types (`type=at_least(1)`, `type=probability`), so argparse checks them wherever a
value is parsed: the command line, a config file and a checkpoint's recorded options alike (utils/config.py
parses those through the same parser), and names the option in its one-line error:
`train.py: error: argument -b/--batch-size: must be 1 or more, not 0`.
"""
import argparse
import difflib
import math
from typing import Callable, Optional

import timm

import models  # noqa: F401  (registers this project's models with timm)


FINITE = 'a finite number'


class Number:
    """An argparse type: a finite number of `kind` (int or float) that `accept` holds for, described by `rule`
    ('0 or more') in the error; `note` says what a boundary value means ('0 keeps none')."""

    def __init__(self, kind: type, rule: str, accept: Callable[[float], bool], note: str = ''):
        self.kind, self.rule, self.accept, self.note = kind, rule, accept, note
        self.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"

    def __call__(self, text: str):
        value = self.kind(text)
        finite = math.isfinite(value)
        if not (finite and self.accept(value)):
            raise argparse.ArgumentTypeError(
                f'must be {"" if finite or self.rule == FINITE else FINITE + ", "}{self.rule}, not {text}'
                + (f'; {self.note}' if self.note else ''))
        return value


def at_least(least: float, kind: type = int, note: str = '') -> Number:
    return Number(kind, f'{least:g} or more', lambda value: value >= least, note)


non_negative = at_least(0, float)
positive = Number(float, 'more than 0', lambda value: value > 0)
probability = Number(float, 'from 0 to 1', lambda value: 0 <= value <= 1)
smoothing = Number(float, 'from 0 to below 1', lambda value: 0 <= value < 1)  # 1 would leave no label
finite = Number(float, FINITE, lambda value: True)
# Normalisation divides by the std: below 1e-3 it would blow pixels up a thousandfold and more.
normalisation_std = Number(float, '0.001 or more', lambda value: value >= 1e-3, 'the image is divided by it')
crop_fraction = Number(float, 'more than 0 and at most 1', lambda value: 0 < value <= 1)
seed_number = Number(int, 'from 0 to 2**32 - 1', lambda value: 0 <= value < 2 ** 32)
# The options several scripts share, with what their boundary value means.
worker_count = at_least(0, note='0 loads the data in the main process')
thread_count = at_least(0, note="0 uses torch's default")
bad_image_limit = at_least(0, note='0 stops at the first unreadable image')

FOLDER_NAME_BYTES = 255  # what file systems allow a file or folder name


def folder_name(text: str) -> str:
    """An argparse type: a name a folder can have."""
    size = len(text.encode())
    if size > FOLDER_NAME_BYTES:
        raise argparse.ArgumentTypeError(f'{size} bytes long, but a folder name may have at most '
                                         f'{FOLDER_NAME_BYTES}; give a shorter one')
    return text


def model_name_problem(name: str) -> Optional[str]:
    """None when timm knows `name`; else a sentence saying it does not, with up to three close names.

    Callers put the option before it and their own advice after it:
    `--model posmlp_tt: no such model; did you mean posmlp_t, posmlp_b, posmlp_s?`
    """
    if timm.is_model(name):
        return None
    close = difflib.get_close_matches(name.split('.')[0], timm.list_models(), n=3, cutoff=0.6)
    return f'no such model; did you mean {", ".join(close)}?' if close else 'no such model.'
