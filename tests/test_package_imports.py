"""amct_core loads lazily: the package and its torch-free modules import without torch, and the public
names (``amct_core.distill`` the function above all) are the same whatever was imported first. Each case
runs in a fresh interpreter, since import order is the point."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.services import REPO


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


_IS_FUNCTION = "import inspect; print(inspect.isfunction({expr}) and {expr}.__module__ == 'amct_core.distill.train')"


@pytest.mark.parametrize("first", [
    "import amct_core",
    "import amct_core.distill",
    "import amct_core.distill.config",
    "from amct_core.distill import calibrate_distill_model",
    "import amct_core.save",
    "from amct_core import save_distill_model",
    "import amct_core.verify",
])
def test_amct_core_distill_is_the_function_whatever_was_imported_first(first):
    code = f"{first}\nimport amct_core\nfrom amct_core import distill\n"
    code += _IS_FUNCTION.format(expr="amct_core.distill") + "\n" + _IS_FUNCTION.format(expr="distill")
    assert _run(code).split() == ["True", "True"]


def test_the_subpackage_distill_stays_importable_by_its_modules():
    out = _run("import amct_core\nfrom amct_core.distill import calibrate_distill_model, load_distill_config\n"
               "import sys\nprint(sys.modules['amct_core.distill'].calibrate_distill_model is calibrate_distill_model)")
    assert out == "True"


def test_every_public_name_resolves():
    out = _run("import amct_core\nprint(all(getattr(amct_core, n) is not None for n in amct_core.__all__))\n"
               "from amct_core import *\nprint(callable(save_distill_model) and issubclass(TargetError, AmctError))")
    assert out.split() == ["True", "True"]


def test_an_unknown_name_is_an_attribute_error_naming_it():
    out = _run("import amct_core\ntry:\n    amct_core.nope\nexcept AttributeError as e:\n    print(e)")
    assert out == "module 'amct_core' has no attribute 'nope'"


def test_the_package_and_its_target_table_load_without_torch():
    out = _run("import sys, amct_core, amct_core.targets, amct_core.errors\n"
               "amct_core.targets.get_target('A2')\nprint('torch' in sys.modules)")
    assert out == "False"
