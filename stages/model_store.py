"""Local checkpoint store: where a model's DiT, VAE and T5 folders live.

Real checkpoints are folders an operator provides (official layouts). The
CPU-sized presets (``magi-tiny``) have no published weights, so their
deterministic random weights are generated once, by each stage's
``write_tiny_checkpoint``, into ``$MAGI_HOME/models/<name>`` (default
``~/.cache/magi-serve/models/<name>``), and then loaded by the same loaders as
real checkpoints. Nothing is ever downloaded.
"""

from __future__ import annotations

import fcntl
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stages.config import ModelConfig, magi_home

GENERATED_PRESETS = {"magi-tiny"}
_DONE_MARKER = ".complete"


@dataclass(frozen=True)
class CheckpointPaths:
    """Folders holding one model's parts, each in its official layout."""

    dit: Path
    vae: Path
    text_encoder: Path


def default_root() -> Path:
    """``$MAGI_HOME/models`` or ``~/.cache/magi-serve/models``."""
    return magi_home() / "models"


def paths_for(model_dir: Path) -> CheckpointPaths:
    return CheckpointPaths(model_dir / "dit", model_dir / "vae", model_dir / "t5")


def ensure_checkpoints(cfg: ModelConfig, root: Path | None = None, seed: int = 0) -> CheckpointPaths:
    """Return the checkpoint folders of ``cfg``, generating tiny ones on first use.

    Generation is atomic (written to a temporary folder, then renamed) and
    serialised by a file lock, so concurrent replicas starting together never
    read a half-written checkpoint.

    Raises:
        FileNotFoundError: a non-generated model's folder is missing or incomplete.
    """
    root = Path(root) if root is not None else default_root()
    model_dir = root / cfg.name
    paths = paths_for(model_dir)
    if cfg.name not in GENERATED_PRESETS:
        missing = [str(p) for p in (paths.dit, paths.vae, paths.text_encoder) if not p.exists()]
        if missing:
            raise FileNotFoundError(f"checkpoint folders missing for model {cfg.name!r}: {missing}")
        return paths
    if (model_dir / _DONE_MARKER).exists():
        return paths
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{cfg.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (model_dir / _DONE_MARKER).exists():
            _generate(cfg, root, model_dir, seed)
    return paths


def _generate(cfg: ModelConfig, root: Path, model_dir: Path, seed: int) -> None:
    from stages.dit.weights import write_tiny_checkpoint as write_dit
    from stages.text_encoder import write_tiny_checkpoint as write_t5
    from stages.vae.weights import write_tiny_checkpoint as write_vae

    tmp = Path(tempfile.mkdtemp(prefix=f".{cfg.name}-", dir=root))
    try:
        staged = paths_for(tmp)
        write_dit(cfg.dit, staged.dit, seed=seed)
        write_vae(cfg.vae, staged.vae, seed=seed)
        write_t5(cfg.text_encoder, staged.text_encoder, seed=seed)
        (tmp / _DONE_MARKER).write_text(cfg.model_dump_json(indent=1))
        if model_dir.exists():
            shutil.rmtree(model_dir)
        tmp.rename(model_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
