"""Model names: whether timm can build a model by a name, and the registered names close to one it cannot."""
import difflib
from typing import Optional

import timm

import models  # noqa: F401  (registers this project's models with timm)


def model_name_problem(name: str) -> Optional[str]:
    """None when timm knows `name`; else a sentence saying it does not, with up to three close names.

    Callers put the option before it and their own advice after it:
    `--model posmlp_tt: no such model; did you mean posmlp_t, posmlp_b, posmlp_s?`
    """
    if timm.is_model(name):
        return None
    close = difflib.get_close_matches(name.split('.')[0], timm.list_models(), n=3, cutoff=0.6)
    return f'no such model; did you mean {", ".join(close)}?' if close else 'no such model.'
