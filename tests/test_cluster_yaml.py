"""cluster.yaml and the GPU configs: valid for Ray's cluster launcher, closed to the internet but SSH,
token authentication on every node, and the values a user must change are marked."""
import ast
import itertools
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TEXT = (REPO / "cluster.yaml").read_text()
CLUSTER = yaml.safe_load(TEXT)
WORLD = {"0.0.0.0/0", "::/0"}


def test_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(CLUSTER))  # what `ray up` does before it launches anything


def _ray_default_inbound_rules(sgids):
    """Ray's own `_create_default_inbound_rules` (aws/config.py), run from its source: that module needs boto3."""
    import ray.autoscaler._private.aws as aws

    source = (Path(aws.__file__).parent / "config.py").read_text()
    wanted = {"_create_default_inbound_rules", "_create_default_intracluster_inbound_rules",
              "_create_default_ssh_inbound_rules"}
    tree = ast.parse(source)
    module = ast.Module(body=[n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted],
                        type_ignores=[])
    scope = {"itertools": itertools}
    exec(compile(module, "ray/autoscaler/_private/aws/config.py", "exec"), scope)
    assert wanted <= set(scope), "Ray's AWS security group code changed: re-check cluster.yaml by hand"
    return scope["_create_default_inbound_rules"](sgids, CLUSTER["provider"]["security_group"]["IpPermissions"])


def _open_to_world(rule) -> bool:
    cidrs = {r.get("CidrIp") for r in rule.get("IpRanges", [])} | {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])}
    return bool(cidrs & WORLD) or bool(rule.get("PrefixListIds"))


def test_only_ssh_is_open_to_the_internet():
    sg = CLUSTER["provider"]["security_group"]
    assert sg["GroupName"]  # an explicit group, created with exactly the rules below
    rules = _ray_default_inbound_rules({"sg-cluster"})
    world = [r for r in rules if _open_to_world(r)]
    assert world, "expected Ray's SSH rule"
    for r in world:
        assert (r["IpProtocol"], r["FromPort"], r["ToPort"]) == ("tcp", 22, 22), r
    # Everything else is intra-cluster: by security group membership, never by address range.
    for r in rules:
        if not _open_to_world(r):
            assert r.get("UserIdGroupPairs") and not r.get("IpRanges") and not r.get("Ipv6Ranges"), r
    # No node type replaces the group with one this file does not describe.
    for name, node in CLUSTER["available_node_types"].items():
        assert "SecurityGroupIds" not in node["node_config"], name


def test_dashboard_is_local_and_every_node_requires_the_token():
    head = " ".join(CLUSTER["head_start_ray_commands"])
    workers = " ".join(CLUSTER["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head  # reached via `ray dashboard cluster.yaml`
    assert "ray-client-server-port" not in head
    for cmds in (CLUSTER["head_start_ray_commands"], CLUSTER["worker_start_ray_commands"]):
        starts = [c for c in cmds if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), starts
    assert "RAY_AUTH_MODE=disabled" not in TEXT
    assert CLUSTER["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the same secret on every node
    setup = " ".join(CLUSTER["setup_commands"])
    assert "export RAY_AUTH_MODE=token" in setup and "chmod 600 ~/.ray/auth_token" in setup
    assert "--address=$RAY_HEAD_IP:6379" in workers


def test_nodes_install_the_project_and_results_go_to_s3():
    assert CLUSTER["file_mounts"]["/home/ubuntu/rayrobust"] == "."
    assert ".gitignore" in CLUSTER["rsync_filter"]  # .venv/ and runs/ stay home
    setup = " ".join(CLUSTER["setup_commands"])
    assert re.search(r"pip install .*-e /home/ubuntu/rayrobust", setup)
    assert re.search(r"RAYROBUST_STORAGE_PATH=s3://", setup)
    nodes = CLUSTER["available_node_types"]
    head = nodes[CLUSTER["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and head["resources"].get("GPU", 0) == 0  # nothing scheduled there
    gpu = [n for k, n in nodes.items() if k != CLUSTER["head_node_type"]]
    assert gpu and all(n["min_workers"] <= n["max_workers"] for n in gpu)
    assert all(n["node_config"]["InstanceType"].startswith(("g", "p")) for n in gpu)


def test_values_to_change_are_marked():
    lines = [line for line in TEXT.splitlines() if not line.lstrip().startswith("#")]
    for needle in ("region:", "ImageId:", "RAYROBUST_STORAGE_PATH=s3://CHANGE", "Arn:"):
        hits = [line for line in lines if needle in line]
        assert hits and all("CHANGE" in line for line in hits), needle


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_gpu_configs(name, classes):
    from rayrobust.config import load_config

    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.data.name == name and cfg.data.download is True
    assert cfg.model.name == "preact_resnet18"
    assert cfg.train.eps == pytest.approx(8 / 255, abs=1e-6) and cfg.eval.eps == pytest.approx(8 / 255, abs=1e-6)
    assert cfg.train.use_gpu is True and cfg.train.num_workers >= 1 and cfg.train.max_failures >= 1
    assert cfg.train.batch_size % cfg.train.num_workers == 0
