"""README.md states what the code does: its model tables and its test command."""
import re

import timm
import torch

import models  # noqa: F401  (registers the models)
from conftest import ROOT


def parameter_count(name: str, **kwargs) -> int:
    with torch.device('meta'):
        model = timm.create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


def test_model_table_parameter_counts_come_from_the_code():
    rows = re.findall(r'^\| `(posmlp_\w+)` \|.*\| ([\d,]+) \| [\d.]+ \|', (ROOT / 'README.md').read_text(), re.M)
    assert len(rows) >= 5
    for name, count in rows:
        assert parameter_count(name) == int(count.replace(',', '')), name


def test_model_zoo_lists_every_registered_model_with_its_count_from_the_code():
    readme = (ROOT / 'README.md').read_text()
    zoo = readme[readme.index('### Model zoo'):]
    zoo = zoo[:zoo.index('\n#')]
    rows = re.findall(r'^\| `(\w+)` \| ([\d,]+)(?: \(([\d,]+) as the authors count\))? \|', zoo, re.M)
    registered = {n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith('models.')}
    assert {'posmlp_t', 'vip_s7', 'eamlp_14', 'resmlp_b24_224'} <= registered <= {name for name, _, _ in rows}
    for name, count, authors_count in rows:
        assert parameter_count(name) == int(count.replace(',', '')), name
        if authors_count:  # EAMLP: the tied token memories counted apart, as its authors' code counts them
            assert parameter_count(name, tied_token_weights=False) == int(authors_count.replace(',', '')), name


def test_ci_runs_the_readme_test_command():
    readme_commands = re.findall(r'^(python3 -m pytest[^\n]*)$', (ROOT / 'README.md').read_text(), re.M)
    ci_lines = (ROOT / '.ci' / 'run').read_text().strip().splitlines()
    assert readme_commands and ci_lines[-1] == readme_commands[0]
