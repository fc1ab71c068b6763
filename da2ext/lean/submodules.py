"""A submodule by its qualified name ("layer1.0.conv1", as named_modules() gives it):
its owner, and replacing it. torch has get_submodule from 1.9 but set_submodule only
from 2.x, and the Jetson's is 1.10."""

__all__ = ["owner_of", "replace_submodule"]


def owner_of(model, qualified_name):
    """(the module holding `qualified_name`, the attribute it holds it under)."""
    owner_name, _, attribute = qualified_name.rpartition(".")
    return (model.get_submodule(owner_name) if owner_name else model), attribute


def replace_submodule(model, qualified_name, module):
    """Put `module` where `qualified_name` is, in place."""
    owner, attribute = owner_of(model, qualified_name)
    setattr(owner, attribute, module)
