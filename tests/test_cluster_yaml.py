"""cluster.yaml against the autoscaler schema shipped in the installed ``ray``, and the keys we rely on.

``ray up`` first merges the file with the provider defaults (``prepare_config``) and then checks it
(``validate_config``: ray/autoscaler/ray-schema.json plus a few cross-field rules) before it calls AWS;
``check`` does the same, so a config that passes here passes that step of ``ray up``.
"""
import copy
import json
import os
import re

import jsonschema
import pytest
import ray
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD, GPU = "ray.head.default", "ray.worker.gpu"
TORCH_PIN = "\"torch==$(python -c 'import torch; print(torch.__version__)')\""


@pytest.fixture(scope="module")
def config():
    with open(os.path.join(ROOT, "cluster.yaml"), encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_schema() -> dict:
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json"), encoding="utf-8") as f:
        return json.load(f)


def check(config: dict) -> None:
    """Validate a cluster config: the bare schema first (``ray up`` would crash on some types before
    reaching it), then Ray's own prepare + validate when this Ray still has them."""
    jsonschema.validate(config, load_schema())
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:
        return
    validate_config(prepare_config(copy.deepcopy(config)))


def test_passes_ray_up_validation(config):
    check(config)


def test_gpu_workers_scale_from_zero_with_declared_gpus(config):
    types = config["available_node_types"]
    assert config["head_node_type"] == HEAD and set(types) == {HEAD, GPU}
    gpu = types[GPU]
    assert gpu["resources"]["GPU"] >= 1 and gpu["resources"]["CPU"] >= 1
    assert gpu["min_workers"] == 0 and 1 <= gpu["max_workers"] <= config["max_workers"]
    assert re.match(r"^(g4dn|g5|g6|g6e|p[3-5])\.", gpu["node_config"]["InstanceType"])
    assert types[HEAD]["resources"].get("GPU", 0) == 0
    assert "IamInstanceProfile" in gpu["node_config"], "workers write to S3 and need credentials"


def test_project_is_mounted_and_installed(config):
    assert config["cluster_name"] == "gpt2-probe"
    assert config["file_mounts"] == {"~/gpt2-probe": "."}
    # The mount is the project root that `ray up` runs in; .gitignore keeps the venv off the wire.
    with open(os.path.join(ROOT, ".gitignore"), encoding="utf-8") as f:
        assert ".venv/" in f.read().split()
    assert ".gitignore" in config["rsync_filter"]
    installs = [c for c in config["setup_commands"] if "pip install" in c]
    assert any(re.search(r"pip install .*-e ~/gpt2-probe(\s|$)", c) for c in installs)
    # torch comes from the image: only ever pinned to the version already there, never fetched by name.
    assert any(TORCH_PIN in c for c in installs)
    for cmd in installs:
        assert not re.search(r"(^|[\s\"'])torch([\s\"'<>=~!\[]|$)", cmd.replace(TORCH_PIN, "")), cmd


def test_cluster_ray_matches_local_ray(config):
    pins = [m for c in config["setup_commands"] for m in re.findall(r"ray\[default\]==([\w.]+)", c)]
    assert pins == [ray.__version__], "cluster and client Ray versions must match for `ray up` and jobs"


def test_dashboard_bound_to_localhost(config):
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])
    assert config["idle_timeout_minutes"] > 0


def _unknown_top_level_key(c):
    c["max_worker"] = 4


def _max_workers_as_string(c):
    c["max_workers"] = "4"


def _fractional_gpu(c):
    c["available_node_types"][GPU]["resources"]["GPU"] = 0.5


def _unknown_node_type_key(c):
    c["available_node_types"][GPU]["min_worker"] = 0


def _missing_node_config(c):
    del c["available_node_types"][GPU]["node_config"]


def _commands_not_a_list(c):
    c["setup_commands"] = "pip install -e ~/gpt2-probe"


@pytest.mark.parametrize("breaks", [
    _unknown_top_level_key, _max_workers_as_string, _fractional_gpu,
    _unknown_node_type_key, _missing_node_config, _commands_not_a_list,
])
def test_broken_copies_fail_schema(config, breaks):
    broken = copy.deepcopy(config)
    breaks(broken)
    with pytest.raises(jsonschema.ValidationError):
        check(broken)


def test_head_type_must_exist(config):
    broken = copy.deepcopy(config)
    broken["head_node_type"] = "ray.head.gpu"
    with pytest.raises(ValueError, match="head_node_type"):
        check(broken)
