"""Shipped deployment profiles (configs/profiles/) and the profile loader."""

from __future__ import annotations

import pytest

from cluster.capacity import DoesNotFit
from cluster.capacity.profiles import PROFILE_DIR, ProfileError, load_profile, load_profiles, main
from cluster.scheduler.kv_areas import default_job_areas
from cluster.units import GiB

SHIPPED = {  # name -> (model preset, gpu, cp_size, pp_size): the layouts issue 5 asks for
    "4.5B-1x4090": ("magi-4.5B-base", "rtx-4090", 1, 1),
    "24B-8xH100": ("magi-24B-base", "h100-80gb-sxm", 8, 1),
    "24B-distill-fp8-8x4090": ("magi-24B-distill-fp8", "rtx-4090", 4, 2),
}


def test_shipped_profiles_are_the_issue_layouts():
    profiles = load_profiles()
    assert {n: (p.model, p.gpu, p.cp_size, p.pp_size) for n, p in profiles.items()} == SHIPPED


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_profile_fits_and_admits_a_job(name):
    profile = load_profiles()[name]
    plan = profile.check()
    assert plan.fits and plan.max_concurrent_jobs >= 1
    assert plan.jobs_per_forward == plan.max_concurrent_jobs  # activations of a step of every admitted job
    assert plan.settings.prefix_forward_chunks == 192 // 4 // 6  # the V2V prefix forward the replica plans
    assert plan.fixed_bytes + plan.max_concurrent_jobs * plan.gpu_bytes_per_job <= plan.memory_bytes
    assert plan.kv.areas == default_job_areas(profile.load_model().sampling)  # the engine's KV region
    assert plan.kv_pool_blocks == plan.max_concurrent_jobs * plan.kv.blocks_per_job


def test_h100_profile_runs_the_reference_resolution():
    plan = load_profiles()["24B-8xH100"].check()
    assert (plan.height, plan.width) == (720, 1280) and plan.num_gpus == 8


def test_h100_profile_bounds_its_forwards_to_one_window():
    """engine.max_forward_tokens = one 5-chunk window: 3 jobs instead of 1 (yaml comment)."""
    profile = load_profiles()["24B-8xH100"]
    plan = profile.check()
    assert profile.max_forward_tokens == 5 * plan.shape.tokens_per_chunk == 108000  # W + 1 chunks
    assert plan.max_concurrent_jobs == 3
    unbounded = profile.model_copy(update={"max_forward_tokens": None}).check()
    assert unbounded.max_concurrent_jobs == 1 and unbounded.activation_bytes > plan.activation_bytes


def _write(tmp_path, text: str, name: str = "p.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = "model: magi-4.5B-base\ngpu: rtx-4090\nheight: 480\nwidth: 480\n"


def test_unknown_key_is_rejected_by_name(tmp_path):
    with pytest.raises(ProfileError, match=r"p\.yaml: cp_sise: unknown key"):
        load_profile(_write(tmp_path, GOOD + "cp_sise: 2\n"))


@pytest.mark.parametrize("line,key", [
    ("model: magi-9B\n", "model"), ("gpu: v100\n", "gpu"), ("kv_pool_fraction: 1.5\n", "kv_pool_fraction"),
    ("cp_size: 0\n", "cp_size"), ("attention: paged\n", "attention"),
])
def test_bad_values_name_the_key(tmp_path, line, key):
    text = "\n".join(l for l in GOOD.splitlines() if not l.startswith(line.split(":")[0] + ":")) + "\n" + line
    with pytest.raises(ProfileError, match=rf"p\.yaml: {key}: "):
        load_profile(_write(tmp_path, text))


def test_missing_keys_and_bad_yaml(tmp_path):
    with pytest.raises(ProfileError, match="gpu: Field required"):
        load_profile(_write(tmp_path, "model: magi-4.5B-base\n"))
    with pytest.raises(ProfileError, match="cannot read YAML"):
        load_profile(_write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ProfileError, match="expected a mapping"):
        load_profile(_write(tmp_path, "- a\n- b\n"))


def test_name_defaults_to_file_stem_and_must_be_unique(tmp_path):
    assert load_profile(_write(tmp_path, GOOD, "small.yaml")).name == "small"
    _write(tmp_path, GOOD + "name: small\n", "other.yaml")
    with pytest.raises(ProfileError, match="defined twice"):
        load_profiles(tmp_path)


def test_impossible_profile_fails_with_shortfall(tmp_path, capsys):
    path = _write(tmp_path, "model: magi-24B-base\ngpu: rtx-4090\n", "24B-1x4090.yaml")
    profile = load_profile(path)
    with pytest.raises(DoesNotFit) as err:
        profile.check()
    short = err.value.plan.shortfall_bytes
    assert short > 0 and f"short by {short / GiB:.1f} GiB per GPU" in str(err.value)
    assert "NVIDIA GeForce RTX 4090" in str(err.value)
    assert main([str(path)]) == 1 and "DOES NOT FIT" in capsys.readouterr().out


def test_cli_prints_every_shipped_profile(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.count("-> FITS") == len(SHIPPED) == len(list(PROFILE_DIR.glob("*.yaml")))
