"""What setup.py decided about the CUDA extension resfuse._C at install time.

setup.py writes ``resfuse/_build_info.json`` into the package it installs
(built / not built / failed, why, the toolkit, the archs and the torch it
was built against), because pip shows none of the build's output unless
the install fails. This module reads that record; it imports neither torch
nor the extension, so it can be asked before either loads.

Where the record is looked for: beside this file (an installed package, or
a checkout built in place by ``setup.py build_ext --inplace``), else in the
installed ``resfuse`` distribution's files (tests and the demo run from a
checkout import the checkout's sources, while the install put the record
and the extension into site-packages).
"""

import importlib.metadata
import json
import os
from functools import lru_cache
from typing import Optional

FILE = "_build_info.json"
_HERE = os.path.dirname(os.path.abspath(__file__))


def installed_package_dir() -> Optional[str]:
    """The ``resfuse`` folder of the installed distribution (site-packages),
    or None when resfuse is not installed or is installed in editable mode
    (its files are then this checkout's). Only an install's own record
    (``*.dist-info/RECORD``) counts: the ``resfuse.egg-info`` that setuptools
    leaves in a checkout it built from lists the checkout's sources."""
    for dist in importlib.metadata.distributions(name="resfuse"):
        if dist.read_text("RECORD") is None:
            continue
        for f in dist.files or ():
            if f.parts == ("resfuse", "__init__.py"):
                return os.path.dirname(str(dist.locate_file(f)))
    return None


@lru_cache(maxsize=None)
def build_info() -> dict:
    """The install-time record. Keys: ``extension`` ("built", "not built",
    "failed" or "unknown"), ``reason`` (why not built / how it failed),
    ``cuda_home``, ``cuda_version``, ``archs``, ``torch``, ``torch_cuda``
    (what the build saw), ``requested`` (RESFUSE_BUILD_CUDA), ``path`` (the
    record's file, None when there is none)."""
    for pkg in (_HERE, installed_package_dir()):
        path = os.path.join(pkg, FILE) if pkg else None
        if path and os.path.isfile(path):
            with open(path) as f:
                record = json.load(f)
            record["path"] = path
            return record
    return {"extension": "unknown", "path": None,
            "reason": "no install record (this resfuse was not installed by setup.py; README command 1 "
                      "installs it)"}


def describe(running_torch: Optional[str] = None) -> str:
    """One line for people: what the install decided, and whether the
    running torch is the one the extension was built against."""
    r = build_info()
    if r["extension"] == "built":
        line = (f"built at install for sm {r['archs']} with CUDA {r['cuda_version']} ({r['cuda_home']}), "
                f"against torch {r['torch']}")
        if running_torch and running_torch != r["torch"]:
            line += (f"; torch {running_torch} is running now, and an extension built against "
                     f"another torch may not load: reinstall (README command 1)")
        return line
    if r["extension"] == "unknown":
        return r["reason"]
    return f"{r['extension']} at install: {r['reason']}"
