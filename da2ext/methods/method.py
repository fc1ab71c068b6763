"""What a training method is: how it turns a backbone into a trainable model,
and the learning rate of each group of what trains (docs/design.md §3a, §5)."""
from ..lean.trainable import parameter_groups

__all__ = ["Method"]


# The baselines' default rates are centred on the scale their 0.1-10 sweep chose in the
# digits table at 8b9e864 (benchmarks/results/digits.md there: ft and bn_train x10, the
# residual adapters x3, the others x0.3), so that the table's sweep of 0.3, 1 and 3 around
# them covers those choices with a point on each side. DA2's come from its own probe.


# No useful Adam rate comes near it; above ~1e37 Adam's first step overflows float32 inside torch.optim
# (lr / (1 - beta1) as a float) with a RuntimeError instead of a clear message.
MAX_RATE = 1e6


class Method(object):
    """name: as the CLI spells it; description: one line for --help and tables;
    build(backbone, num_classes) -> the model to train (rewritten in place);
    learning_rates: Adam learning rate per parameter group ("adaptors", "branches", "shifts",
    "head", "other"; "default" for any group not named)."""

    def __init__(self, name, description, build, learning_rates):
        self.name = name
        self.description = description
        self._build = build
        self.learning_rates = dict(learning_rates)

    def build(self, backbone, num_classes):
        return self._build(backbone, num_classes)

    def param_groups(self, model, lr_scale=1.0, learning_rates=None):
        """Optimizer parameter groups of the trainable parameters, each with its lr.

        learning_rates: {group: rate} in place of the method's own rates for
        those groups (an ablation: rate 0 keeps a group as it starts); every
        group named must have trainable parameters in `model`. lr_scale
        multiplies every rate, these included."""
        found = parameter_groups(model)
        overrides = dict(learning_rates or {})
        unknown = sorted(set(overrides) - set(found))
        if unknown:
            raise ValueError("learning_rates: method {} trains no parameters in group(s) {}; its groups here: "
                             "{}".format(self.name, ", ".join(unknown), ", ".join(sorted(found))))
        for group, rate in overrides.items():
            if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate < float("inf"):
                raise ValueError("learning_rates: the rate of group {} must be a finite number >= 0, got {!r}".format(
                    group, rate))
        groups = []
        for group, params in sorted(found.items()):
            lr = overrides.get(group, self.learning_rates.get(group, self.learning_rates.get("default")))
            if lr is None:
                raise ValueError("method {}: no learning rate for parameter group {!r}".format(self.name, group))
            if not 0 <= lr * lr_scale <= MAX_RATE:
                raise ValueError("learning_rates: the rate of group {} is {:g} (x lr_scale {:g}); Adam rates must be "
                                 "in [0, {:g}]".format(group, lr, lr_scale, MAX_RATE))
            groups.append({"params": params, "lr": lr * lr_scale, "name": group})
        return groups

    def __repr__(self):
        return "Method({!r})".format(self.name)
