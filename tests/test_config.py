"""Config parsing, overrides and validation messages."""
import pytest

from rayrobust.config import ExperimentConfig, config_from_dict, load_config
from rayrobust.errors import ConfigError


def test_demo_config_loads_with_expected_values():
    cfg = load_config("configs/demo.yaml")
    assert cfg.methods == ["standard", "pgd_at", "drp", "spat", "clustr", "srd"]  # baselines + the four defenses
    assert cfg.stages == ["train", "extract", "cluster", "dictionaries", "evaluate"]
    assert cfg.eval.eps == 0.1 and cfg.eval.n_eval >= 1000 and cfg.eval.n_autoattack >= 200
    assert cfg.data.name == "fashion_mnist"
    for method in cfg.methods:  # the reduced methods still get AutoAttack on >= 200 images
        assert cfg.for_method(method).eval.n_autoattack >= 200
    assert cfg.for_method("srd").train.epochs == 1 and cfg.for_method("pgd_at").train.epochs == 3
    assert cfg.for_method("srd").train.method_args == {"srd": {"fista_iters": 5}}


def test_overrides_dotted_bare_and_lists():
    cfg = load_config("configs/demo.yaml", ["train.epochs=5", "method=trades", "eval.eps=0.2", "methods=standard,pgd_at"])
    assert cfg.train.epochs == 5 and isinstance(cfg.train.epochs, int)
    assert cfg.train.method == "trades"
    assert cfg.eval.eps == pytest.approx(0.2)
    assert cfg.methods == ["standard", "pgd_at"]


@pytest.mark.parametrize("override, fragment", [
    ("train.epoch=3", "did you mean 'epochs'"),
    ("eval.eps=0", "outside (0, 1]"),
    ("eval.eps=1.5", "outside (0, 1]"),
    ("train.eps=-0.1", "outside (0, 1]"),
    ("train.epochs=zero", "cannot read 'zero'"),
    ("bogus.key=1", "sections are"),
    ("eps=0.1", "ambiguous"),
    ("eval.n_autoattack=5000", "between 0 and eval.n_eval"),
    ("noequals", "key=value"),
])
def test_bad_values_raise_clear_config_errors(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("configs/demo.yaml", [override])
    assert fragment in str(info.value)


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_roundtrip_through_dict():
    cfg = load_config("configs/demo.yaml", ["train.seed=7"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and isinstance(again, ExperimentConfig)


def test_run_dir_is_a_path_or_a_uri_and_relative_ones_live_under_the_storage_root(tmp_path, monkeypatch, s3_server):
    """What cluster.yaml relies on: a relative run_dir lives under RAYROBUST_STORAGE_PATH (or storage_path);
    a URI or an absolute path is used as given; an unknown scheme is refused when the config is read."""
    from rayrobust.config import STORAGE_ENV, load_config
    from rayrobust.errors import RayRobustError

    monkeypatch.delenv(STORAGE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert load_config(None, ["run_dir=runs/x"]).run_location().local_path() == tmp_path / "runs" / "x"
    root = s3_server.make_bucket("storage-root") + "/rayrobust"
    monkeypatch.setenv(STORAGE_ENV, root)
    cfg = load_config(None, ["run_dir=runs/x"])
    assert cfg.run_location().uri == f"{root}/runs/x"
    assert cfg.layout().checkpoints("pgd_at").uri == f"{root}/runs/x/pgd_at/checkpoints"
    assert load_config(None, [f"run_dir={tmp_path / 'abs'}"]).run_location().local_path() == tmp_path / "abs"
    assert load_config(None, ["run_dir=s3://other-bucket/y"]).run_location().uri == "s3://other-bucket/y"
    assert load_config(None, ["run_dir=runs/x", f"storage_path={tmp_path}/root"]).run_location().uri == \
        str(tmp_path / "root" / "runs" / "x")
    with pytest.raises(RayRobustError, match="unknown storage scheme 'foo://'"):
        load_config(None, ["run_dir=foo://bucket/run"])
