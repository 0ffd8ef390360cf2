"""A DiTEngine replica checks at start-up that the model fits its device (issue 5.3): one that
cannot fit refuses to start, and Serve reports the planner's message (what is short, what to
change), before any checkpoint is looked for."""

from __future__ import annotations

import pytest

from cluster.config import DeploymentSettings, Deployments, ParallelSettings, ServiceConfig
from cluster.serve.app import _configure
from cluster.serve.dit_engine import DiTEngineDeployment


def test_replica_that_cannot_fit_refuses_to_start(service):
    from ray import serve

    cfg = ServiceConfig(model="magi-24B-base", parallel=ParallelSettings(gpu="rtx-4090"),
                        deployments=Deployments(dit_engine=DeploymentSettings(num_cpus=0.1)))
    app = _configure(DiTEngineDeployment, cfg.deployments.dit_engine).bind(cfg)
    try:
        with pytest.raises(RuntimeError, match="magi-nofit failed"):
            serve.run(app, name="magi-nofit", route_prefix=None)
        text = serve.status().applications["magi-nofit"].deployments["DiTEngine"].message
    finally:
        serve.delete("magi-nofit")
    assert "DiTEngine replica cannot start" in text
    assert "parallel.cp_size" in text
