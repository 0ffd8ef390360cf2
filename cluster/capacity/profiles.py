"""Deployment profiles: which model preset runs on which GPUs with which cp x pp layout.

A profile is a small YAML file in ``configs/profiles/`` holding a model preset name
(:data:`stages.config.PRESETS`), a GPU type (:data:`cluster.capacity.gpus.GPUS`) and the
:class:`~cluster.capacity.fit.FitSettings` keys (``cp_size``, ``pp_size``, ``height``,
``width``, ``kv_pool_fraction``, ...). Unknown keys are rejected and every error names its
key. ``python -m cluster.capacity.profiles FILE...`` prints each profile's plan.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, field_validator

from cluster.capacity.fit import FitPlan, FitSettings, plan_fit
from cluster.capacity.report import check_fits
from cluster.capacity.gpus import GPUS
from stages.config import ModelConfig, check_preset, load_preset

PROFILE_DIR = Path(__file__).resolve().parents[2] / "configs" / "profiles"


class ProfileError(ValueError):
    """A profile file is unreadable or invalid; the message names the file and the key."""


class DeploymentProfile(FitSettings):
    """One replica layout (a :class:`FitSettings` plus what to run where).

    Attributes:
        name: profile name (defaults to the file name without ``.yaml``).
        description: free text for operators.
        model: model preset name.
        gpu: GPU type key.
    """

    name: str
    description: str = ""
    model: str
    gpu: str

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return check_preset(value)

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, value: str) -> str:
        if value.lower() not in GPUS:
            raise ValueError(f"unknown GPU type {value!r}; known: {sorted(GPUS)}")
        return value.lower()

    def load_model(self) -> ModelConfig:
        return load_preset(self.model)

    def settings(self) -> FitSettings:
        """The planner settings alone (profile identity fields dropped)."""
        return FitSettings(**self.model_dump(include=set(FitSettings.model_fields)))

    def plan(self) -> FitPlan:
        """:func:`cluster.capacity.fit.plan_fit` for this profile."""
        return plan_fit(self.load_model(), self.gpu, self.settings())

    def check(self) -> FitPlan:
        """:func:`cluster.capacity.report.check_fits` for this profile (raises ``DoesNotFit``)."""
        return check_fits(self.load_model(), self.gpu, self.settings())


def _format(exc: ValidationError) -> str:
    msgs = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<top level>"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        msgs.append(f"{key}: {msg}")
    return "; ".join(msgs)


def profile_from_dict(data: dict[str, Any], source: str, default_name: str = "") -> DeploymentProfile:
    """Validate a profile mapping.

    Raises:
        ProfileError: ``source: key: reason`` for each bad key.
    """
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: expected a mapping of profile keys")
    if default_name and "name" not in data:
        data = {"name": default_name, **data}
    try:
        return DeploymentProfile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(f"{source}: {_format(exc)}") from None


def load_profile(path: str | Path) -> DeploymentProfile:
    """Load and validate one profile YAML file.

    Raises:
        ProfileError: unreadable YAML or an invalid / unknown key (named).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ProfileError(f"{path}: cannot read YAML: {exc}") from None
    return profile_from_dict(data, str(path), default_name=path.stem)


def load_profiles(folder: str | Path = PROFILE_DIR) -> dict[str, DeploymentProfile]:
    """All ``*.yaml`` profiles of ``folder`` by name.

    Raises:
        ProfileError: an invalid file, or two files with the same profile name.
    """
    profiles: dict[str, DeploymentProfile] = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        profile = load_profile(path)
        if profile.name in profiles:
            raise ProfileError(f"{path}: name: profile {profile.name!r} is defined twice")
        profiles[profile.name] = profile
    return profiles


def main(argv: list[str] | None = None) -> int:
    """Print the plan of each profile file given (default: every shipped profile); exit 1 if
    any does not fit."""
    paths = argv if argv else sorted(str(p) for p in PROFILE_DIR.glob("*.yaml"))
    status = 0
    for path in paths:
        plan = load_profile(path).plan()
        print(f"[{path}]\n{plan.explain()}\n")
        status |= 0 if plan.fits else 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
