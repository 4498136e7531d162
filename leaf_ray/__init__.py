"""leaf-ray: LEAF distillation of text-embedding models on Ray."""

from huggingface_hub import utils as _hub_utils
from transformers.utils import logging as _transformers_logging

# Every Ray worker that loads a model (teacher actors, trainers, eval tasks) would draw
# transformers' weight-loading bar into the logs. Hub downloads keep their bars (transformers'
# switch turns those off too).
_hub_bars = not _hub_utils.are_progress_bars_disabled()
_transformers_logging.disable_progress_bar()
if _hub_bars:
    _hub_utils.enable_progress_bars()
