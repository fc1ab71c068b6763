"""Training methods, by name (DESIGN.md §5). A method is a Method (method.py): how
it builds the trainable model from a backbone and its learning rates. Adding one
is a small module defining a Method and one line in METHODS below."""
from collections import OrderedDict

from .batchnorm_training import BN_TRAIN
from .deep_attention_adaptor import DA2, DA2_ADAPTOR_ONLY, DA2_EAGER
from .finetune import FT
from .frozen_baselines import BIAS, BIAS_LEAN, LAST
from .lite_residual import TINYTL
from .lora_conv import LORA_CONV
from .method import Method
from .piggyback import PIGGYBACK
from .residual_adapters import PARALLEL_ADAPTER, SERIES_ADAPTER

METHODS = OrderedDict((m.name, m) for m in (FT, LAST, BN_TRAIN, BIAS, BIAS_LEAN, TINYTL, SERIES_ADAPTER,
                                            PARALLEL_ADAPTER, PIGGYBACK, LORA_CONV, DA2_EAGER, DA2_ADAPTOR_ONLY, DA2))

__all__ = ["METHODS", "Method", "get"]


def get(name):
    """The Method called `name` (see METHODS)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError("unknown method {!r}; methods: {}".format(name, ", ".join(METHODS)))
