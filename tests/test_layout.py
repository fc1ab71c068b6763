"""The package's layout: each part imports only the parts below it, no module
imports another's private names, `import da2ext` stays light, and the public
names are there.

`import da2ext` loads the layers a model needs (ops, nn, lean, models, domains,
training's loop) and nothing of da2ext.data, da2ext.methods or da2ext.cli, which
load where they are used."""
import ast
import os
import subprocess
import sys

import da2ext

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(da2ext.__file__)))
PACKAGE_DIR = os.path.dirname(os.path.abspath(da2ext.__file__))

# The architecture, bottom-up: what each part of da2ext may import besides itself
# (prefixes of module names under da2ext). The command line (cli) may import any
# part; the package's __init__ any but data, methods and cli (checked below, by
# importing it); __main__ only cli.
ALLOWED = {
    "ops": ("_C", "_build_info"),         # the kernels' Python side; ops/_extension.py loads da2ext._C
                                          # (and reads what its build recorded beside it)
    "nn": ("ops",),                       # the modules users put in models
    "profiling": (),                      # what autograd keeps and a step costs: a tool of every layer
    "lean": ("ops", "nn", "profiling"),   # the lean frozen backbone
    "methods": ("lean",),                 # the training methods, built on the lean backbone
    "domains": ("lean", "methods", "profiling"),  # MultiDomainModel and what goes to disk
    "models": ("domains.safe_load",),     # the backbones (their weight files load through safe_load)
    "data": ("models",),                  # a domain's images, normalised as its backbone expects
    "training": ("data", "domains", "lean", "models", "profiling"),  # workflow -> loop (lean: shift calibration)
    "deploy": ("ops", "nn", "lean", "domains"),  # a learned domain as a plain inference model and its files
}


def package_imports():
    """[(importing module, imported module, imported name or None)] of every da2ext
    import in the package, those inside functions included."""
    found = []
    for directory, _, files in os.walk(PACKAGE_DIR):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            parts = ["da2ext"] + os.path.relpath(path, PACKAGE_DIR)[:-3].split(os.sep)
            is_package = parts[-1] == "__init__"
            module = ".".join(parts[:-1] if is_package else parts)
            package = module.split(".") if is_package else module.split(".")[:-1]
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = package[:len(package) - (node.level - 1)]
                        target = ".".join(base + ([node.module] if node.module else []))
                    else:
                        target = node.module or ""
                    if target.split(".")[0] == "da2ext":
                        found.extend((module, target, alias.name) for alias in node.names)
                elif isinstance(node, ast.Import):
                    found.extend((module, alias.name, None) for alias in node.names
                                 if alias.name.split(".")[0] == "da2ext")
    return found


def part(module):
    """"ops", "lean", ..., "profiling", "__main__", or "" for da2ext itself."""
    return module.split(".")[1] if "." in module else ""


def test_package_imports_were_found():
    imports = package_imports()
    assert ("da2ext.training.workflow", "da2ext.training.loop", "train_domain") in imports
    assert ("da2ext.domains.multidomain", "da2ext", "methods") in imports  # a function-level import


def test_each_part_imports_only_the_parts_below_it():
    wrong = []
    for module, target, name in package_imports():
        source = part(module)
        if source in ("", "cli"):
            continue
        # `from da2ext import methods` imports the module da2ext.methods
        full = target + "." + name if target == "da2ext" and name is not None else target
        relative = full.split(".", 1)[1] if "." in full else ""
        if part(full) == source:
            continue
        allowed = ("cli",) if source == "__main__" else ALLOWED[source]
        if not any(relative == a or relative.startswith(a + ".") for a in allowed):
            wrong.append("{} imports {}".format(module, full))
    assert not wrong, "\n".join(wrong)


def test_only_the_command_line_runs_the_training_workflow():
    """The loop, the domains and the data never call back into the workflow (or the CLI)."""
    callers = sorted(set(module for module, target, name in package_imports()
                         if target.startswith("da2ext.training.workflow") or target.startswith("da2ext.cli")
                         or (target == "da2ext.training" and name == "workflow")))
    assert callers == ["da2ext.__main__", "da2ext.cli", "da2ext.cli.digits_demo"], callers


def test_no_module_imports_private_names_of_another():
    """A private name (_x) stays in its module, a private module (ops/_extension.py)
    in its package."""
    wrong = []
    for module, target, name in package_imports():
        if (module, target, name) == ("da2ext.ops._extension", "da2ext", "_C"):
            continue  # the compiled extension, loaded in one place
        private_name = name is not None and name.startswith("_") and not name.startswith("__")
        private_modules = [".".join(target.split(".")[:i]) for i, p in enumerate(target.split("."), 1)
                           if p.startswith("_") and not p.startswith("__")]
        outside = [m for m in private_modules
                   if not (module + ".").startswith(m.rpartition(".")[0] + ".")]  # not in m's package
        if private_name or outside:
            wrong.append("{} imports {} from {}".format(module, name, target))
    assert not wrong, "\n".join(wrong)


def modules_after(code):
    """The da2ext modules loaded after running `code` in a fresh Python process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    script = code + "\nimport sys\nprint('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] == 'da2ext')))"
    result = subprocess.run([sys.executable, "-c", script], cwd=PACKAGE_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout.split()


def test_import_da2ext_loads_no_data_methods_deploy_or_cli_module():
    loaded = modules_after("import da2ext")
    assert "da2ext" in loaded and "da2ext.ops" in loaded, loaded
    heavy = [m for m in loaded if m.split(".")[1:2] in (["data"], ["methods"], ["deploy"], ["cli"])]
    assert not heavy, "import da2ext loaded {}".format(heavy)


def test_methods_load_when_a_model_needs_them():
    loaded = modules_after("import da2ext, torchvision\nda2ext.MultiDomainModel(torchvision.models.resnet18())")
    assert "da2ext.methods" in loaded
    assert not [m for m in loaded if m.split(".")[1:2] in (["data"], ["cli"])], loaded


def test_public_names():
    for name in da2ext.__all__ + ["backbones", "reference"]:
        assert hasattr(da2ext, name), name
    assert da2ext.reference.ResidualAttentionAdaptor is not da2ext.ResidualAttentionAdaptor
    assert callable(da2ext.backbones.efficientnet_lite0)
    from da2ext import methods
    from da2ext.training import evaluate, train_domain  # noqa: F401
    assert methods.get("da2").name == "da2"


def test_the_train_and_eval_commands_call_the_training_layer_only():
    """`train` and `eval` read top-down: the command line calls the training
    workflow (and, under torchrun, training.distributed), which calls data,
    models, the loop and the domain files; the commands reach past it into none
    of them."""
    path = os.path.join(PACKAGE_DIR, "cli", "__init__.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    commands = ("_build", "_train", "_train_process", "_eval")
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in commands:
            found[node.name] = sorted(set("." * inner.level + (inner.module or "")
                                          for inner in ast.walk(node) if isinstance(inner, ast.ImportFrom)))
    assert sorted(found) == sorted(commands)
    assert found["_train_process"] == ["..training.workflow"], found
    wrong = {name: modules for name, modules in found.items()
             if any(not module.startswith("..training.") for module in modules)}
    assert not wrong, wrong
