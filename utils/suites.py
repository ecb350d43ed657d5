"""Named sets of models for `benchmark.py --suite`, with the speeds their source publishes beside them.

`comparison` is the table of MLP-like models that the PosMLP paper's README compares against (the
Vision Permutator README's table) plus PosMLP-T/S/B, timed against ViP-Small/7 so that a run on any
machine can be set beside the table's column: img/s on one V100 (32 GB) at batch 32 and 224 x 224,
719 img/s for ViP-Small/7.
"""
import dataclasses
from typing import Dict, List, Tuple

@dataclasses.dataclass(frozen=True)
class Suite:
    models: Tuple[str, ...]
    baseline: str
    reference_img_per_sec: Dict[str, float]  # published throughputs; absent where the source gives none
    reference: str  # where those figures come from and how they were measured


SUITES = {
    'comparison': Suite(
        models=('eamlp_14', 'gmlp_s16_224', 'resmlp_24_224', 'vip_s7', 'eamlp_19', 'mixer_b16_224', 'vip_m7',
                'gmlp_b16_224', 'resmlp_b24_224', 'vip_l7', 'posmlp_t', 'posmlp_s', 'posmlp_b'),
        baseline='vip_s7',
        reference_img_per_sec=dict(eamlp_14=711, resmlp_24_224=715, vip_s7=719, eamlp_19=464, vip_m7=418,
                                   resmlp_b24_224=231, vip_l7=298),
        reference='the paper\'s comparison table: one V100 (32 GB), batch 32, 224 x 224',
    ),
}


def reference_columns(suite: Suite) -> Tuple[Tuple[str, str], ...]:
    """The printed table's titles and keys of the published figures."""
    return ('paper img/s', 'paper_img_per_sec'), (f'paper vs {suite.baseline}', 'paper_vs_baseline')


def add_reference_columns(rows: List[Dict[str, object]], suite: Suite):
    """The published img/s and its ratio to the baseline's beside each inference row of a suite model run
    with its default settings; the table gives one throughput per model, so training rows get none."""
    base = suite.reference_img_per_sec[suite.baseline]
    for row in rows:
        published = suite.reference_img_per_sec.get(row['model'])
        if row['mode'] != 'infer' or row['setting'] != 'default' or published is None:
            published = None
        row['paper_img_per_sec'] = published
        row['paper_vs_baseline'] = None if published is None else round(published / base, 3)
