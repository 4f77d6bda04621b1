"""The architecture rule: the core and the reader helper never import Dagster."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import importlib, pkgutil, sys
import imagenet_int8_assets.core as core
for module in pkgutil.iter_modules(core.__path__):
    importlib.import_module(f"imagenet_int8_assets.core.{module.name}")
import imagenet_int8_assets.reader
print(sorted(k for k in sys.modules if k == "dagster" or k.startswith("dagster.")))
"""


def test_core_and_reader_import_without_dagster():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_package_lists_its_lazy_definitions_for_dagster():
    import imagenet_int8_assets

    assert "defs" in dir(imagenet_int8_assets)
