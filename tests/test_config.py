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
])
def test_bad_settings_are_one_clear_error(key, value, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_run_config({key: value})


def test_resume_accepts_a_key_added_later_only_at_its_default():
    from fl_unlearn.runs import check_same_run

    stored = RunConfig().to_run_config()
    del stored["catalog-method"]  # a run made before the key existed
    check_same_run(stored, RunConfig(resume_from="/runs/old"))
    with pytest.raises(ConfigError, match="catalog-method"):
        check_same_run(stored, RunConfig(resume_from="/runs/old", catalog_method="original"))
