"""README.md states what the code does: its model table and its test command."""
import re

import timm
import torch

import models  # noqa: F401  (registers the models)
from conftest import ROOT


def test_model_table_parameter_counts_come_from_the_code():
    rows = re.findall(r'^\| `(posmlp_\w+)` \|.*\| ([\d,]+) \| [\d.]+ \|', (ROOT / 'README.md').read_text(), re.M)
    assert len(rows) >= 5
    for name, count in rows:
        with torch.device('meta'):
            model = timm.create_model(name)
        assert sum(p.numel() for p in model.parameters()) == int(count.replace(',', '')), name


def test_ci_runs_the_readme_test_command():
    readme_commands = re.findall(r'^(python3 -m pytest[^\n]*)$', (ROOT / 'README.md').read_text(), re.M)
    ci_lines = (ROOT / '.ci' / 'run').read_text().strip().splitlines()
    assert readme_commands and ci_lines[-1] == readme_commands[0]
