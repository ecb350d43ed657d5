"""The README's quickstart, as a new user runs it: train on scikit-learn's digits, then eval.sh the best checkpoint."""
import re
import subprocess
import sys
import time

from conftest import ROOT, script_env

TIME_LIMIT_S = 300
MIN_TOP1 = 95.0


def test_quickstart_reaches_95_percent_and_eval_sh_reports_the_logged_top1(tmp_path):
    start = time.time()
    readme_command = [sys.executable, str(ROOT / 'train.py'), '-c', str(ROOT / 'configs' / 'quickstart.yaml')]
    trained = subprocess.run(readme_command, cwd=tmp_path, capture_output=True, text=True, timeout=TIME_LIMIT_S)
    seconds = time.time() - start
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert seconds < TIME_LIMIT_S
    assert (tmp_path / 'data' / 'digits' / 'train').is_dir() and (tmp_path / 'data' / 'digits' / 'val').is_dir()
    best = re.search(r'Best eval top1: (\S+) at epoch (\d+)', trained.stdout)
    assert best, trained.stdout[-3000:]
    assert float(best.group(1)) >= MIN_TOP1
    print(f'quickstart: {seconds:.0f}s, best val top-1 {best.group(1)} at epoch {best.group(2)}')

    readme_command = ['bash', str(ROOT / 'eval.sh'), 'data/digits/val', 'output/quickstart/model_best.pth.tar']
    evaluated = subprocess.run(readme_command, cwd=tmp_path, env=script_env(), capture_output=True, text=True,
                               timeout=120)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    assert f'top1 {best.group(1)} ' in evaluated.stdout
    assert 'live weights (state_dict)' in evaluated.stdout
