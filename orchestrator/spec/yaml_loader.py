"""YAML as users write it: PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is the *string* "1e-3";
here it is the number 0.001, as in YAML 1.2 and every other tool. A key given twice in one mapping
(``epochs: 40`` ... ``epochs: 2``), at any depth, is an error naming the key and both lines: PyYAML
keeps the last silently, which would train what the reader of the spec did not see. Keys that a
merge (``<<: *base``) brings in may be overridden, as YAML intends. Specs, claims files and ``--set``
values all load through :func:`load`."""

from __future__ import annotations

import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:  # before flatten_mapping: the keys written here, not merged ones
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeLoader refuses it below, with its mark
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (also on line {first.start_mark.line + 1}), and YAML "
                        "would silently keep the last; give it once", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


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


def describe(exc: yaml.YAMLError, path: object) -> str:
    """``PATH:LINE:COLUMN: problem`` of a YAML error, on one line (PATH alone where it has no mark)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{where}: {problem}"
