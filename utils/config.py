"""Option values from YAML config files (`train.py -c FILE`) and from a checkpoint's recorded options, parsed
by the script's own argparse parser.

Each option: value becomes the command-line words that say the same, and argparse parses them with its
types, choices and numbers of values, as it parses the command line:

    lr: 2e-3                       --lr=2e-3
    model_ema: true / false        --model-ema / --no-model-ema   (no_aug: false is --aug)
    scale: [0.08, 1.0]             --scale 0.08 1.0
    model_kwargs: {gate: lrpe}     --model-kwargs gate='lrpe'
    clip_grad: null                unset (None), which the command line cannot say

Keys are option names, with dashes or underscores. An unknown key, or a value its option does not take,
stops the script with one line that names the file, the key, its words and what argparse found wrong.
"""
import argparse
import os
from typing import Any, Dict, List, Optional

import yaml


def switch(dest: str, on: bool) -> str:
    """The switch that turns the on/off option `dest` on or off: --x / --no-x; for an option named no_x, whose
    on means off, --no-x / --x."""
    name = dest.replace('_', '-')
    inverted = name.startswith('no-')
    base = name[len('no-'):] if inverted else name
    return f'--{base}' if on != inverted else f'--no-{base}'


def option_words(dest: str, value: Any) -> List[str]:
    """The command-line words that give option `dest` the YAML `value` (see the module's docstring)."""
    flag = '--' + dest.replace('_', '-')
    if isinstance(value, bool):
        return [switch(dest, value)]
    if isinstance(value, dict):
        return [flag, *(f'{key}={item!r}' for key, item in value.items())]
    if isinstance(value, (list, tuple)):
        return [flag, *map(str, value)]
    return [f'{flag}={value}']


class ConfigurableParser(argparse.ArgumentParser):
    """argparse's parser, which also parses mappings of option: value (a config file, a checkpoint's recorded
    options) through `parse_mapping`; an error in one names where it came from and the key."""

    _reading: Optional[str] = None  # the mapping entry being parsed, for error messages

    def error(self, message):
        super().error(f'{self._reading}: {message}' if self._reading else message)

    def option_defaults(self) -> Dict[str, Any]:
        """{option (dest): its value when the command line does not give it}, for every option."""
        return vars(self.parse_args([]))

    def parse_mapping(self, mapping: Dict[Any, Any], source: str) -> Dict[str, Any]:
        """{option (dest): value} for every entry of `mapping`, each parsed from its command-line words;
        `source` names the mapping in errors ('config FILE')."""
        unset = self.option_defaults()
        values = {}
        for key, value in mapping.items():
            dest = str(key).replace('-', '_')
            if dest not in unset:
                self.error(f'{source}: unknown key {key!r}; it is not an option of {self.prog} '
                           f'(see {self.prog} --help for the option names).')
            values[dest] = None if value is None else self._parse_entry(source, key, dest, value, unset)
        return values

    def _parse_entry(self, source: str, key: Any, dest: str, value: Any, unset: Dict[str, Any]) -> Any:
        words = option_words(dest, value)
        self._reading = f'{source}: {key}: {value!r} (read as {" ".join(words)})'
        try:
            parsed = vars(self.parse_args(words))
            # Words beyond what the option takes go to the positional argument, or to another option.
            if any(parsed[name] != unset[name] for name in parsed if name != dest):
                self.error('more values than the option takes')
        finally:
            self._reading = None
        return parsed[dest]


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping that gives a key twice."""


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping giving a key twice, which safe_load silently resolves to the last
    value. Keys merged in with `<<` may still be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            if key_node.tag == 'tag:yaml.org,2002:merge' or not isinstance(key_node, yaml.ScalarNode):
                continue
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in lines:
                raise DuplicateKeyError(f'key {key!r} is given twice, on lines {lines[key]} and {line}')
            lines[key] = line
        return super().construct_mapping(node, deep)


def read_config(parser: argparse.ArgumentParser, path: str) -> Dict[Any, Any]:
    """The option: value mapping of a YAML config file; parser.error names the file and the problem when it is
    missing, unreadable, not UTF-8, not YAML, gives a key twice, or sets nothing."""
    if not os.path.isfile(path):
        parser.error(f'config file {path} does not exist; check the path (the configs are in configs/).')
    try:
        with open(path, 'rb') as f:
            raw = f.read()
    except OSError as e:
        parser.error(f'config {path} cannot be read: {e.strerror}; check its permissions.')
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b'\n') + 1
        parser.error(f'config {path} is not UTF-8 text (byte {raw[e.start]:#04x} on line {line}); save it as UTF-8.')
    try:
        config = yaml.load(text, Loader=UniqueKeyLoader)
    except DuplicateKeyError as e:
        parser.error(f'config {path}: {e}; keep one of them.')
    except yaml.YAMLError as e:
        parser.error(f'config {path} is not valid YAML: {e}')
    if config is None or config == {}:
        parser.error(f'config {path} is empty: it sets no options. Write option: value lines into it '
                     f'(see configs/), or leave out -c.')
    if not isinstance(config, dict):
        parser.error(f'config {path} must be a mapping of option: value, not a {type(config).__name__}.')
    return config
