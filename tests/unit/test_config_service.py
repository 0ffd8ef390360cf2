"""ServiceConfig: defaults, YAML loading, errors naming the bad key, ray_serve.yaml consistency."""

from pathlib import Path

import pytest
import yaml

from cluster.config import ConfigError, ServiceConfig

ROOT = Path(__file__).resolve().parents[2]
SERVE_YAML = ROOT / "ray_serve.yaml"


def test_defaults_fit_on_two_cpus():
    cfg = ServiceConfig()
    d = cfg.deployments
    total = sum(s.num_cpus * s.num_replicas for s in (d.ingress, d.text_encoder, d.dit_engine, d.vae_decoder))
    assert total <= 2.0
    assert cfg.load_model().name == "magi-tiny"


def test_ray_serve_yaml_loads_and_matches_builder_settings():
    from ray.serve.schema import ServeDeploySchema

    from cluster.serve.app import GRPC_SERVICER_FUNCTIONS

    raw = yaml.safe_load(SERVE_YAML.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    cfg = ServiceConfig.from_yaml(SERVE_YAML)
    assert schema.applications[0].import_path == "cluster.serve.app:build_app"
    assert schema.grpc_options.port == cfg.grpc_port
    assert tuple(schema.grpc_options.grpc_servicer_functions) == GRPC_SERVICER_FUNCTIONS
    assert schema.grpc_options.request_timeout_s is None
    assert all(s.graceful_shutdown_timeout_s > 20 for s in dict(cfg.deployments).values())


def test_shipped_yaml_spells_out_the_defaults():
    assert ServiceConfig.from_yaml(SERVE_YAML) == ServiceConfig()


def test_bare_yaml(tmp_path):
    path = tmp_path / "svc.yaml"
    path.write_text("model: magi-tiny\nlimits:\n  max_chunks: 8\n")
    assert ServiceConfig.from_yaml(path).limits.max_chunks == 8


@pytest.mark.parametrize(
    "text, key",
    [
        ("limits:\n  max_chunks: 0\n", "limits.max_chunks"),
        ("limits:\n  max_chunkz: 3\n", "limits.max_chunkz"),
        ("deployments:\n  dit_engine:\n    num_cpus: -1\n", "deployments.dit_engine.num_cpus"),
        ("model: magi-huge\n", "model"),
        ("grpc_port: 70000\n", "grpc_port"),
        ("bogus: 1\n", "bogus"),
    ],
)
def test_errors_name_the_key(tmp_path, text, key):
    path = tmp_path / "svc.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        ServiceConfig.from_yaml(path)
    assert f"{key}:" in str(info.value) and str(path) in str(info.value)


def test_serve_config_args_are_checked(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("applications:\n  - import_path: x:y\n    args:\n      limits: {max_steps: nope}\n")
    with pytest.raises(ConfigError, match=r"limits\.max_steps:"):
        ServiceConfig.from_yaml(path)


def test_unreadable_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("limits: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read YAML"):
        ServiceConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="cannot read YAML"):
        ServiceConfig.from_yaml(tmp_path / "missing.yaml")


def test_build_app_rejects_bad_args():
    from cluster.serve.app import build_app

    with pytest.raises(ConfigError, match=r"args: limits\.max_chunks:"):
        build_app({"limits": {"max_chunks": -3}})
