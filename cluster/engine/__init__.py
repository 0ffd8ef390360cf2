"""DiT engine: plan -> execute -> update loop over the chunk scheduler (never imports ray)."""

from cluster.engine.loop import Engine, JobRun

__all__ = ["Engine", "JobRun"]
