"""What a training method is: how it turns a backbone into a trainable model,
and the learning rate of each group of what trains (DESIGN.md §3a, §5)."""
from ..trainable import parameter_groups

__all__ = ["Method"]


class Method(object):
    """name: as the CLI spells it; description: one line for --help and tables;
    build(backbone, num_classes) -> the model to train (rewritten in place);
    learning_rates: Adam learning rate per parameter group ("adaptors", "shifts",
    "head", "other"; "default" for any group not named)."""

    def __init__(self, name, description, build, learning_rates):
        self.name = name
        self.description = description
        self._build = build
        self.learning_rates = dict(learning_rates)

    def build(self, backbone, num_classes):
        return self._build(backbone, num_classes)

    def param_groups(self, model, lr_scale=1.0):
        """Optimizer parameter groups of the trainable parameters, each with its lr."""
        groups = []
        for group, params in sorted(parameter_groups(model).items()):
            lr = self.learning_rates.get(group, self.learning_rates.get("default"))
            if lr is None:
                raise ValueError("method {}: no learning rate for parameter group {!r}".format(self.name, group))
            groups.append({"params": params, "lr": lr * lr_scale, "name": group})
        return groups

    def __repr__(self):
        return "Method({!r})".format(self.name)
