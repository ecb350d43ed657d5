"""One suggestion of close model names, the same in every script that takes --model."""
import pytest

import benchmark
import onnx_export
import validate
from utils.args import parse_train_args
from utils.option_checks import model_name_problem

SUGGESTION = 'posmlp_tt: no such model; did you mean posmlp_t'


def test_close_names_are_suggested():
    assert model_name_problem('posmlp_t') is None
    assert model_name_problem('posmlp_tt').startswith('no such model; did you mean posmlp_t')
    assert model_name_problem('gmlp_s16_224.some_tag') is None  # timm's pretrained tags are part of a name
    assert model_name_problem('zzzzzz') == 'no such model.'


@pytest.mark.parametrize('parse', [
    lambda: parse_train_args(['--model', 'posmlp_tt', 'data']),
    lambda: validate.main(['data', '--checkpoint', 'x', '--model', 'posmlp_tt']),
    lambda: benchmark.parse_args(['--model', 'posmlp_tt']),
    lambda: onnx_export.main(['x.onnx', '--model', 'posmlp_tt']),
], ids=['train', 'validate', 'benchmark', 'onnx_export'])
def test_every_script_suggests_the_same_names(parse, capsys):
    with pytest.raises(SystemExit):
        parse()
    assert SUGGESTION in capsys.readouterr().err
