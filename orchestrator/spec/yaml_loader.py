"""YAML as users write it: PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is the *string* "1e-3";
here it is the number 0.001, as in YAML 1.2 and every other tool. Specs and ``--set`` values both
load through :func:`load`."""

from __future__ import annotations

import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    pass


# YAML 1.1's float pattern, plus exponents without a dot or with an unsigned exponent (1e-3, 5E3, 2.5e4)
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def load(text: str) -> Any:
    """Parse YAML ``text`` (raises ``yaml.YAMLError`` on bad syntax)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
