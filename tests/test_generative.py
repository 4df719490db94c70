"""The generative model: memorization on a tiny set, per-image seeds, latent scale, checkpoints, FedAvg, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_unlearn.checkpoint import load_checkpoint, save_checkpoint
from fl_unlearn.errors import ConfigError
from fl_unlearn.models.diffusion import (
    NoiseSchedule,
    UNetConfig,
    VAEConfig,
    build_unet,
    build_vae,
    sampling_scheduler,
    train_scheduler,
)
from fl_unlearn.pipeline import LatentStats, SamplerConfig, image_seeds, sample_latents
from fl_unlearn.training.ldm import LDMTrainConfig, train_ldm
from fl_unlearn.training.vae import VAETrainConfig, decode_latents, encode_latents, reconstruct, train_vae

TINY_UNET = UNetConfig(channels=(32, 64), layers_per_block=1)
SCHEDULE = NoiseSchedule()


def tiny_latents(n: int = 4, seed: int = 0) -> np.ndarray:
    """Structured 4×8×8 "latents": smooth blobs, standardised, distinct per item."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:8, 0:8] / 7.0
    out = []
    for _ in range(n):
        c = rng.uniform(0.2, 0.8, size=(4, 2))
        out.append(np.stack([np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.05) for cx, cy in c]))
    z = np.array(out, dtype=np.float32)
    return (z - z.mean()) / z.std()


def nearest_distance(samples: torch.Tensor, train: np.ndarray) -> np.ndarray:
    d = torch.cdist(samples.flatten(1), torch.as_tensor(train).flatten(1))
    return d.min(1).values.numpy()


@pytest.fixture(scope="module")
def overfit_unet():
    torch.manual_seed(0)
    latents, labels = tiny_latents(), np.array([0, 1, 0, 1])
    unet = build_unet(TINY_UNET, 8, 4)
    untrained = build_unet(TINY_UNET, 8, 4)
    untrained.load_state_dict(unet.state_dict())
    # Each item 4× per batch: lower-variance steps over the whole noise range.
    train_ldm(unet, train_scheduler(SCHEDULE), np.tile(latents, (4, 1, 1, 1)), np.tile(labels, 4),
              LDMTrainConfig(steps=1500, batch_size=16, lr=3e-3, label_dropout=0.0, seed=0))
    return unet, untrained, latents, labels


def test_a_tiny_ldm_overfit_on_four_items_reproduces_them(overfit_unet):
    unet, untrained, latents, labels = overfit_unet
    sampler = SamplerConfig(steps=25, guidance_scale=1.0)
    seeds = image_seeds(0, 8)
    y = np.tile(labels, 2)
    trained = nearest_distance(sample_latents(unet, sampling_scheduler(SCHEDULE), y, seeds, (4, 8, 8), sampler), latents)
    fresh = nearest_distance(sample_latents(untrained, sampling_scheduler(SCHEDULE), y, seeds, (4, 8, 8), sampler),
                             latents)
    between_items = torch.cdist(torch.as_tensor(latents).flatten(1), torch.as_tensor(latents).flatten(1))
    closest_pair = float(between_items[between_items > 0].min())
    assert np.median(trained) < 0.35 * np.median(fresh), (trained, fresh)
    assert np.median(trained) < 0.4 * closest_pair, (trained, closest_pair)


def test_sampled_latents_keep_the_training_scale_because_clipping_is_off(overfit_unet):
    unet, _, latents, labels = overfit_unet
    scheduler = sampling_scheduler(SCHEDULE)
    assert scheduler.config.clip_sample is False
    z = sample_latents(unet, scheduler, np.tile(labels, 2), image_seeds(1, 8), (4, 8, 8),
                       SamplerConfig(steps=25, guidance_scale=1.0))
    assert 0.7 < float(z.flatten(1).std(1).median()) / float(latents.std()) < 1.4
    assert float(z.abs().max()) > 1.0  # a clipping sampler would cap at 1


@pytest.mark.parametrize("bf16", [False, True])
def test_the_same_seed_gives_the_identical_image_whatever_the_batch(overfit_unet, bf16):
    unet, _, _, _ = overfit_unet
    scheduler = sampling_scheduler(SCHEDULE)
    cfg = SamplerConfig(steps=5, eta=0.5, guidance_scale=2.0, batch_size=3, bf16=bf16)
    a = sample_latents(unet, scheduler, np.array([0, 1, 1]), np.array([11, 22, 33]), (4, 8, 8), cfg)
    b = sample_latents(unet, scheduler, np.array([1, 0]), np.array([22, 11]), (4, 8, 8), cfg)
    torch.testing.assert_close(a[0], b[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(a[1], b[0], rtol=0, atol=1e-5)
    assert not torch.allclose(a[0], a[1])
    np.testing.assert_array_equal(image_seeds(3, 10)[4:], image_seeds(3, 6, offset=4))


def test_vae_trains_encodes_and_decodes_with_the_right_shapes():
    torch.manual_seed(0)
    images = (np.random.default_rng(0).random((8, 32, 32)) * 255).astype(np.uint8)
    vae = build_vae(VAEConfig(channels=(8, 16, 16), latent_channels=4), 32)
    before = train_vae(vae, images, VAETrainConfig(steps=1, batch_size=8, seed=0))["loss"]
    after = train_vae(vae, images, VAETrainConfig(steps=30, batch_size=8, lr=3e-3, seed=0))["loss"]
    assert after < before
    z = encode_latents(vae, images)
    assert z.shape == (8, 4, 8, 8) and z.dtype == np.float32
    np.testing.assert_array_equal(encode_latents(vae, images), z)  # posterior mean: deterministic
    assert decode_latents(vae, z).shape == (8, 32, 32) and reconstruct(vae, images).dtype == np.uint8



def test_vae_rounds_continue_one_schedule_and_adams_moments():
    """A second round's call picks up the first's place in the one-cycle schedule and Adam's moments."""
    from fl_unlearn.training.common import one_cycle

    images = (np.random.default_rng(1).random((8, 32, 32)) * 255).astype(np.uint8)
    torch.manual_seed(0)
    vae = build_vae(VAEConfig(channels=(8, 16), latent_channels=4), 32)
    common = {"batch_size": 4, "lr": 3e-3, "ssim_weight": 0.5, "hard_pixel_weight": 1.0, "total_steps": 6}
    first = train_vae(vae, images, VAETrainConfig(steps=3, seed=0, **common))
    assert first["hard"] >= first["rec"]  # the worst 1% of pixels err more than the mean
    second = train_vae(vae, images, VAETrainConfig(steps=3, seed=1, start_step=3, **common),
                       optimizer_state=first["optimizer_state"])
    state = second["optimizer_state"]
    assert {float(s["step"]) for s in state["state"].values()} == {6.0}  # moments carried over 3 + 3 steps
    assert state["param_groups"][0]["lr"] == pytest.approx(3e-3 * one_cycle(5, 6))  # the cycle's last step
    constant = train_vae(vae, images, VAETrainConfig(steps=2, lr=3e-3))["optimizer_state"]
    assert constant["param_groups"][0]["lr"] == 3e-3
    with pytest.raises(ConfigError, match="fit in the schedule"):
        train_vae(vae, images, VAETrainConfig(steps=3, start_step=4, total_steps=6))


def test_latent_stats_from_hospital_moments_equal_the_pooled_statistics():
    rng = np.random.default_rng(0)
    parts = [rng.normal(2.0, 3.0, size=(n, 4, 8, 8)) for n in (5, 9)]
    stats = LatentStats.from_moments([LatentStats.moments(p) for p in parts])
    pooled = np.concatenate(parts)
    np.testing.assert_allclose(stats.mean, pooled.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(stats.std, pooled.std(axis=(0, 2, 3)), rtol=1e-6)
    z = torch.as_tensor(pooled).float()
    torch.testing.assert_close(stats.denormalize(stats.normalize(z)), z, rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip(tmp_path):
    unet = build_unet(TINY_UNET, 8, 4)
    path = save_checkpoint(tmp_path / "ckpt" / "unet.safetensors", unet.state_dict(), {"round": 3})
    state, meta = load_checkpoint(path)
    assert meta == {"round": 3}
    for key, value in unet.state_dict().items():
        assert torch.equal(state[key], value)
    assert not list((tmp_path / "ckpt").glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="incomplete or missing"):
        load_checkpoint(tmp_path / "ckpt" / "other.safetensors")


def test_fedavg_of_two_hospitals_is_the_example_weighted_mean(tmp_path):
    from fl_unlearn.config import load_preset
    from fl_unlearn.runs import RunDirectory
    from server.federation import Federation
    from server.rounds import fedavg_rounds
    from tests.fake_grid import FakeGrid

    local = {0: (torch.full((3,), 1.0), 10), 1: (torch.full((3,), 4.0), 30)}
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        weights, n = local[int(context.node_config["partition-id"])]
        return Message(RecordDict({"arrays": ArrayRecord(torch_state_dict={"w": weights}),
                                   "metrics": MetricRecord({"num-examples": n, "loss": 0.0, "seconds": 0.0})}),
                       reply_to=msg)

    config = load_preset("test", {"output-dir": str(tmp_path), "num-hospitals": 2})
    run = RunDirectory(config)
    federation = Federation(FakeGrid(app, config.to_run_config(), 2), config)
    federation.hospital_of_node = {1000: 0, 1001: 1}
    run.start_phase("toy")
    out = fedavg_rounds(federation, run, phase="toy", rounds=1, initial={"w": torch.zeros(3)},
                        checkpoint=tmp_path / "toy.safetensors", config={})
    torch.testing.assert_close(out["global"]["w"], torch.full((3,), (1.0 * 10 + 4.0 * 30) / 40))


def run_server(config, grid=None):
    from clients.client_app import app as client_app
    from server.server_app import app as server_app
    from tests.fake_grid import FakeGrid

    run_config = config.to_run_config()
    grid = grid or FakeGrid(client_app, run_config, config.num_hospitals)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return grid


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from fl_unlearn.config import load_preset

    root = tmp_path_factory.mktemp("gen")
    config = load_preset("test", {"output-dir": str(root / "runs"), "cache-dir": str(root / "cache")})
    run_server(config)
    return config


def test_the_test_preset_trains_and_writes_the_synthetic_set(finished_run):
    run_dir = finished_run.run_dir
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert [p for p, v in manifest["phases"].items() if v["status"] == "completed"] == \
        ["setup", "train-vae", "encode", "train-ldm", "train-reid", "generate", "audit",
         *(f"unlearn-{m}" for m in finished_run.methods), "train-classifier", "evaluate"]
    assert len(manifest["phases"]["train-ldm"]["history"]) == finished_run.ldm_rounds
    images = np.load(run_dir / "synthetic" / "original" / "images.npy")
    assert images.shape == (finished_run.num_synthetic, 32, 32) and images.dtype == np.uint8
    index = (run_dir / "synthetic" / "original" / "index.csv").read_text().splitlines()
    assert index[0] == "index,label,seed" and len(index) == finished_run.num_synthetic + 1
    assert (run_dir / "synthetic" / "original" / "grid.png").is_file()
    for name in ("vae", "unet"):
        assert (run_dir / "checkpoints" / f"{name}.safetensors").is_file()


def test_resume_skips_completed_phases(finished_run):
    config = finished_run.replace(resume_from=str(finished_run.run_dir))
    grid = run_server(config)
    assert {m.metadata.message_type for m in grid.sent} == {"query.describe"}


def test_resume_continues_an_interrupted_phase_from_its_last_round(finished_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    # As if killed after round 1 of train-ldm: the round-1 checkpoint is rebuilt by a 1-round run below.
    one_round = finished_run.replace(output_dir=str(tmp_path / "one"), ldm_rounds=1, num_synthetic=2)
    run_server(one_round)
    shutil.copy(one_round.run_dir / "checkpoints" / "unet-train.safetensors", copy / "checkpoints")
    shutil.copy(one_round.run_dir / "checkpoints" / "unet-train.json", copy / "checkpoints")
    manifest["phases"]["train-ldm"] = {"status": "running", "round": 1,
                                       "history": manifest["phases"]["train-ldm"]["history"][:1]}
    manifest["phases"].pop("generate")
    (copy / "manifest.json").write_text(json.dumps(manifest))

    grid = run_server(finished_run.replace(resume_from=str(copy)))
    trained = [m for m in grid.sent if m.metadata.message_type == "train"]
    # train-ldm resumes at round 2; the phases after it consume its model, so they run again in full
    assert [(m.content["config"]["phase"], m.content["config"]["round"]) for m in trained][::3][:2] == \
        [("train-ldm", 2), ("train-reid", 1)]
    assert json.loads((copy / "manifest.json").read_text())["phases"]["audit"]["status"] == "completed"
    resumed, _ = load_checkpoint(copy / "checkpoints" / "unet.safetensors")
    original, _ = load_checkpoint(finished_run.run_dir / "checkpoints" / "unet.safetensors")
    for key in original:
        torch.testing.assert_close(resumed[key], original[key], rtol=0, atol=0)


def test_resume_with_changed_later_settings_reruns_from_the_phase_they_affect(finished_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, copy)
    # as if an earlier session had been interrupted in the first unlearning phase: it must not resume there,
    # since its inputs (the re-ID networks, hence the forget sets) change
    first = f"unlearn-{finished_run.methods[0]}"
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["phases"][first].update(status="running", round=1)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    grid = run_server(finished_run.replace(resume_from=str(copy), reid_local_steps=finished_run.reid_local_steps + 1))
    trained = [m.content["config"] for m in grid.sent if m.metadata.message_type == "train"]
    phases = [c["phase"] for c in trained]
    assert phases[0] == "train-reid" and not {"train-vae", "train-ldm"} & set(phases)
    assert next(c["round"] for c in trained if c["phase"] == first) == 1
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["run_config"]["reid-local-steps"] == \
        finished_run.reid_local_steps + 1
    assert manifest["resumed"][-1]["changed"] == {
        "reid-local-steps": [finished_run.reid_local_steps, finished_run.reid_local_steps + 1]}
    for name in ("vae", "unet"):  # the generative model is kept, byte for byte
        assert (copy / "checkpoints" / f"{name}.safetensors").read_bytes() == \
            (finished_run.run_dir / "checkpoints" / f"{name}.safetensors").read_bytes()


def test_resume_from_a_run_of_another_config_is_refused(finished_run):

    with pytest.raises(ConfigError, match="another configuration.*phantom-patients.*start a new run"):
        run_server(finished_run.replace(resume_from=str(finished_run.run_dir),
                                        phantom_patients=finished_run.phantom_patients + 1))
