"""Keep the scripts offline: nothing they run may download weights, configs or data sets.

train.py, validate.py, benchmark.py and the tools in utils/ import this module first, before timm:
the Hugging Face hub client (which timm uses for hub weights, and `hfds/` data sets) reads these
variables once, when it is imported, and then answers from its local cache or fails. timm's other
downloads, from URLs, only happen for `pretrained=True`, which a checkpoint never passes on
(`models.recorded_model_kwargs`) and the scripts refuse (`utils.args`).
"""
import os

OFFLINE_ENVIRONMENT = {'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1'}

os.environ.update(OFFLINE_ENVIRONMENT)
