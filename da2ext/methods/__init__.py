"""Training methods, by name (docs/design.md §5). A method is a Method (method.py): how
it builds the trainable model from a backbone and its learning rates. Adding one
is a small module defining a Method and one line in METHODS below."""
from collections import OrderedDict

from .batchnorm_training import BN_TRAIN
from .deep_attention_adaptor import (DA2, DA2_ADAPTOR_ONLY, DA2_ALL_BLOCKS, DA2_EAGER, DA2_NO_BRANCHES, DA2_RANK4,
                                     parametrised)
from .finetune import FT
from .frozen_baselines import BIAS, BIAS_LEAN, LAST
from .lite_residual import TINYTL
from .lora_conv import LORA_CONV
from .method import Method
from .piggyback import PIGGYBACK
from .residual_adapters import PARALLEL_ADAPTER, SERIES_ADAPTER

METHODS = OrderedDict((m.name, m) for m in (FT, LAST, BN_TRAIN, BIAS, BIAS_LEAN, TINYTL, SERIES_ADAPTER,
                                            PARALLEL_ADAPTER, PIGGYBACK, LORA_CONV, DA2_EAGER, DA2_ADAPTOR_ONLY,
                                            DA2_RANK4, DA2_ALL_BLOCKS, DA2_NO_BRANCHES, DA2))

__all__ = ["METHODS", "Method", "get"]


def get(name):
    """The Method called `name`: one of METHODS, or da2_tail<k> (da2 with the last k
    blocks trained), da2_budget<MiB> (da2 with the largest tail within a budget) or
    da2_half_recompute (da2 keeping the recomputed blocks' inputs in float16)."""
    if name in METHODS:
        return METHODS[name]
    method = parametrised(name) if isinstance(name, str) else None
    if method is None:
        raise ValueError("unknown method {!r}; methods: {}, da2_tail<k>, da2_budget<MiB>, da2_half_recompute".format(
            name, ", ".join(METHODS)))
    return method
