"""The package's layout: `import da2ext` stays light, and the public names are there.

`import da2ext` loads the layers a model needs (ops, nn, lean, models, domains,
training's loop) and nothing of da2ext.data, da2ext.methods or da2ext.cli, which
load where they are used."""
import os
import subprocess
import sys

import da2ext

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(da2ext.__file__)))


def modules_after(code):
    """The da2ext modules loaded after running `code` in a fresh Python process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    script = code + "\nimport sys\nprint('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] == 'da2ext')))"
    result = subprocess.run([sys.executable, "-c", script], cwd=PACKAGE_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout.split()


def test_import_da2ext_loads_no_data_methods_or_cli_module():
    loaded = modules_after("import da2ext")
    assert "da2ext" in loaded and "da2ext.ops" in loaded, loaded
    heavy = [m for m in loaded if m.split(".")[1:2] in (["data"], ["methods"], ["cli"])]
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
