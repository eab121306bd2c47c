"""Cluster launcher configs must validate against the schema that Ray itself ships."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def ray_schema() -> dict:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_config_is_valid_for_ray(path):
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, ray_schema())
    # what wbsweep relies on: the project is installed on every node
    assert any("pip install" in c and "wbsweep" in c for c in config["setup_commands"])


def test_schema_rejects_a_broken_config():
    config = yaml.safe_load((CLUSTER / "a100.yaml").read_text())
    config["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_schema())
