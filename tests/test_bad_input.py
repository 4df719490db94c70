"""The bad-input catalogue: each bad input to a run is one clear error, raised before anything is written.

Every case goes through the ServerApp (the entry point of `flwr run`) on the test preset with one
thing wrong, and the output folder must stay empty. Errors found only when an image is decoded
(corrupt files) are covered where they arise, in tests/test_loaders.py, and name the file.
"""

from __future__ import annotations

import json

import pytest
from flwr.app import Context, RecordDict

from fl_unlearn.config import RunConfig, load_preset
from fl_unlearn.errors import ConfigError, DataError
from tests.test_loaders import MIMIC_LABELS, _write_mimic


def _requests(tmp_path, text: str) -> str:
    path = tmp_path / "requests.csv"
    path.write_text(text)
    return str(path)


def _mimic(tmp_path, **kwargs) -> str:
    return str(_write_mimic(tmp_path / "mimic", **kwargs))


def _other_run(tmp_path) -> str:
    folder = tmp_path / "old" / "test"
    folder.mkdir(parents=True)
    stored = load_preset("test").replace(phantom_patients=41).to_run_config()
    (folder / "manifest.json").write_text(json.dumps({"run_config": stored, "phases": {}}))
    return str(folder)


# (id, run-config overrides (a callable of tmp_path for files), error type, what the message must name)
CASES = [
    ("unknown-key", {"no-such-key": 1}, ConfigError, "unknown run-config key 'no-such-key'"),
    ("wrong-type", {"num-hospitals": "three"}, ConfigError, "num-hospitals"),
    ("negative-rounds", {"vae-rounds": -1}, ConfigError, "vae-rounds"),
    ("zero-local-steps", {"ldm-local-steps": 0}, ConfigError, "ldm-local-steps"),
    ("threshold-above-1", {"audit-threshold": 1.5}, ConfigError, "audit-threshold"),
    ("threshold-below-0", {"audit-threshold": -0.1}, ConfigError, "audit-threshold"),
    ("unknown-method", {"unlearn-methods": "kl-away,erase"}, ConfigError, "unknown method"),
    ("method-twice", {"unlearn-methods": "ga,ga"}, ConfigError, "twice"),
    ("unknown-source", {"data-source": "dicom"}, ConfigError, "data-source"),
    ("real-source-without-root", {"data-source": "mimic"}, ConfigError, "needs data-root"),
    ("vae-cannot-downsample", {"image-size": 36, "vae-channels": "8,16,16,32"}, ConfigError,
     "image-size = 36 cannot be downsampled 3 times"),
    ("unet-cannot-downsample-latents", {"image-size": 40, "vae-channels": "8,16,16,32"}, ConfigError,
     "5×5 latents .* cannot be downsampled 1 times by the UNet"),
    ("bad-channel-list", {"unet-channels": "16,abc"}, ConfigError, "unet-channels"),
    ("siss-lambda-outside", {"siss-lambda": 1.5}, ConfigError, "siss-lambda"),
    ("unknown-catalog-set", {"catalog-method": "best"}, ConfigError, "catalog-method"),
    ("unknown-backbone", {"reid-backbone": "vgg"}, ConfigError, "reid-backbone"),
    ("missing-fid-weights", {"fid-inception-weights": "/no/such/pt_inception.pth"}, ConfigError,
     "fid-inception-weights"),
    ("more-hospitals-than-patients", {"num-hospitals": 100}, DataError, "num-hospitals = 100 but only"),
    ("hospital-without-training-patients", {"hospital-holdout-fraction": 1.0}, (ConfigError, DataError),
     "hospital-holdout-fraction"),
    ("empty-test-set", {"test-fraction": 0.001}, DataError, "empty test set"),
    ("missing-requests-file", {"deletion-requests": "/no/such/requests.csv"}, DataError, "does not exist"),
    ("requests-without-patient-column", lambda t: {"deletion-requests": _requests(t, "hospital,id\nhospital-0,P1\n")},
     DataError, "no 'patient' column"),
    ("request-for-unknown-patient", lambda t: {"deletion-requests": _requests(t, "hospital,patient\nhospital-2,P99999\n")},
     DataError, "hospital-2: .*P99999"),
    ("data-root-missing", lambda t: {"data-source": "mimic", "data-root": str(t / "nowhere")}, DataError,
     "does not exist"),
    ("csv-missing-column", lambda t: {"data-source": "mimic", "data-root": _mimic(t, drop_column="ViewPosition")},
     DataError, r"has no column\(s\) \['ViewPosition'\]"),
    ("unknown-label-value", lambda t: {"data-source": "mimic", "data-root": _mimic(
        t, labels=[*MIMIC_LABELS[:1], ("10000032", "53189527", "yes"), *MIMIC_LABELS[2:]])},
     DataError, "Cardiomegaly value 'yes'"),
    ("images-not-on-disk", lambda t: {"data-source": "mimic", "data-root": _mimic(t), "num-hospitals": 1,
                                      "test-fraction": 0.0}, DataError, "are not on disk"),
    ("resume-from-a-non-run", lambda t: {"resume-from": str(t / "not-a-run")}, ConfigError, "holds no manifest"),
    ("resume-from-another-config", lambda t: {"resume-from": _other_run(t)}, ConfigError, "phantom-patients"),
]


@pytest.mark.parametrize(("overrides", "error", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, overrides, error, message):
    from clients.client_app import app as client_app
    from server.server_app import app as server_app
    from tests.fake_grid import FakeGrid

    output = tmp_path / "runs"
    settings = overrides(tmp_path) if callable(overrides) else overrides
    run_config = {**load_preset("test", {"output-dir": str(output), "cache-dir": str(tmp_path / "cache")})
                  .to_run_config(), **settings}
    before = {p for p in tmp_path.rglob("*")}

    with pytest.raises(error, match=message):
        server_app(FakeGrid(client_app, {k: v for k, v in run_config.items()}, 3),
                   Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))

    written = {p for p in tmp_path.rglob("*")} - before
    assert not [p for p in written if "cache" not in p.relative_to(tmp_path).parts], written


def test_the_catalogue_has_at_least_20_cases():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


def test_a_gpu_fraction_on_a_cpu_only_machine_is_refused_before_anything_starts(capsys, monkeypatch):
    import torch

    from scripts.run import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "test", "--gpus-per-hospital", "0.5"])
    assert exit_info.value.code == 2
    assert "--gpus-per-hospital 0.5 needs a CUDA GPU" in capsys.readouterr().err


def test_run_config_errors_name_the_key_without_a_run():
    with pytest.raises(ConfigError, match="audit-top-k"):
        RunConfig.from_run_config({"audit-top-k": 0})
