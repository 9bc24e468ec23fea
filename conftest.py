"""The repository's pytest configuration: what ``python -m pytest`` must not collect.

``--doctest-modules`` imports every module of the package; a module built on an optional extra
(``autoprobe.hf`` subclasses transformers' ``TrainerCallback``) is left out when that extra is
not installed, instead of failing the collection.
"""

import importlib.util

_EXTRAS = {"autoprobe/hf.py": ("transformers", "safetensors")}

collect_ignore = [
    path for path, packages in _EXTRAS.items() if any(importlib.util.find_spec(p) is None for p in packages)
]
