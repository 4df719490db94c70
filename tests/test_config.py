"""The run configuration: one typed source of truth, mirrored by pyproject.toml, presets that load."""

from __future__ import annotations

import pytest

from fl_unlearn.config import PRESET_DIR, RunConfig, load_preset, pyproject_defaults
from fl_unlearn.errors import ConfigError


def test_pyproject_run_config_mirrors_the_typed_defaults():
    # plain `flwr run .` reads pyproject.toml; the library's defaults must be the same values
    assert pyproject_defaults() == RunConfig().to_run_config()


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
def test_every_preset_loads(name):
    overrides = {"data-root": "/data/mimic"} if name == "paper" else {}
    config = load_preset(name, overrides)
    assert config.run_name == name
    assert config.methods  # every preset unlearns with at least one method


@pytest.mark.parametrize(("key", "value", "message"), [
    ("unlearn-methods", "kl-away,erase", "unknown method"),
    ("unlearn-methods", "ga,ga", "twice"),
    ("siss-lambda", 1.5, "siss-lambda"),
    ("audit-target-fpr", 0.9, "audit-target-fpr"),
    ("reid-backbone", "vgg", "reid-backbone"),
    ("no-such-key", 1, "unknown run-config key"),
    ("device", "tpu", "device = 'tpu' is not one of"),
])
def test_bad_settings_are_one_clear_error(key, value, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_run_config({key: value})


def test_resume_accepts_a_key_added_later_only_at_its_default():
    from fl_unlearn.runs import check_same_run

    stored = RunConfig().to_run_config()
    del stored["catalog-method"]  # a run made before the key existed
    assert check_same_run(stored, RunConfig(resume_from="/runs/old")) == {}
    # not at its default, it changes what the phase it belongs to would do: that phase runs again
    assert check_same_run(stored, RunConfig(resume_from="/runs/old", catalog_method="original")) == \
        {"catalog-method": "evaluate"}


def test_resume_maps_each_changed_setting_to_the_first_phase_it_affects():
    from fl_unlearn.runs import check_same_run, phase_of_setting

    stored = RunConfig().to_run_config()
    changed = check_same_run(stored, RunConfig(resume_from="/r", reid_rounds=9, kl_cap=2.0, vae_lr=1e-3))
    assert changed == {"reid-rounds": "train-reid", "kl-cap": "unlearn-", "vae-lr": "train-vae"}
    assert phase_of_setting("ldm-patients") == "" and phase_of_setting("ldm-lr") == "train-ldm"
    assert phase_of_setting("seed") == "" and phase_of_setting("catalog-method") == "evaluate"
    # every setting is either fixed or owned by a phase that exists
    from server.phases import phases_for

    names = [n for n, _ in phases_for(RunConfig())]
    for key in stored:
        phase = phase_of_setting(key)
        assert not phase or any(n == phase or n.startswith(phase) for n in names if phase.endswith("-")) \
            or phase in names, key
    with pytest.raises(ConfigError, match="seed"):
        check_same_run(stored, RunConfig(resume_from="/r", seed=1))


def test_the_device_follows_what_the_process_sees(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert RunConfig().torch_device == torch.device("cpu") == RunConfig(device="cpu").torch_device
    with pytest.raises(ConfigError, match="device = 'cuda' but this process sees no CUDA GPU"):
        _ = RunConfig(device="cuda").torch_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert RunConfig().torch_device == torch.device("cuda")  # a hospital given a GPU share uses it
    assert RunConfig(device="cpu").torch_device == torch.device("cpu")
