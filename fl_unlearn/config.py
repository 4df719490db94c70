"""One typed run configuration, read from Flower's run config (kebab-case keys) or a preset file."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_unlearn.errors import ConfigError

if TYPE_CHECKING:
    import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PRESET_DIR = PROJECT_ROOT / "configs"

PARTITION_STRATEGIES = ("iid", "label-skew", "size-skew")
TEST_SPLITS = ("random", "source")
LABEL_POLICIES = ("drop", "u-zeros", "u-ones")
DATA_SOURCES = ("phantom", "mimic", "nih", "chexpert")


@dataclass(frozen=True)
class RunConfig:
    """Every knob of a run. Field ``foo_bar`` is the run-config key ``foo-bar``."""

    # run bookkeeping
    run_name: str = "cpu"
    output_dir: str = "runs"
    seed: int = 0
    num_hospitals: int = 3
    wait_for_nodes_s: float = 120.0
    # data
    data_source: str = "phantom"
    data_root: str = ""
    cache_dir: str = ""
    image_size: int = 64
    label_policy: str = "drop"
    missing_as_negative: bool = False
    # partitions
    partition_strategy: str = "iid"
    dirichlet_alpha: float = 0.5
    test_fraction: float = 0.3
    test_split: str = "random"
    hospital_patients: int = 0
    # the embedded phantom cohort
    phantom_patients: int = 300
    phantom_prevalence: float = 0.4
    phantom_max_images: int = 100
    phantom_images_exponent: float = 2.0
    # inside each hospital: patients kept out of all training (re-ID validation, calibration), and
    # how many of the rest the generative model is trained on (0 = all)
    hospital_holdout_fraction: float = 0.3
    ldm_patients: int = 16
    # autoencoder
    vae_channels: str = "16,32,64"
    vae_latent_channels: int = 8
    vae_rounds: int = 4
    vae_local_steps: int = 250
    vae_batch_size: int = 16
    vae_lr: float = 3e-3
    vae_kl_weight: float = 1e-6
    vae_ssim_weight: float = 0.5
    # weight of each image's worst 1% pixel errors: 1-2 px granulomas are what L1 + SSIM gives up first
    vae_hard_pixel_weight: float = 1.0
    # "one-cycle": one learning-rate cycle over all rounds, each hospital keeping AdamW's moments between rounds
    # (as for the LDM and re-ID); "constant": a fresh AdamW at vae-lr every round
    vae_lr_schedule: str = "one-cycle"
    # latent diffusion model
    unet_channels: str = "64,128,128"
    unet_layers_per_block: int = 1
    unet_attention: bool = False
    ldm_rounds: int = 20
    ldm_local_steps: int = 25
    ldm_batch_size: int = 64
    ldm_lr: float = 5e-4
    ldm_loss: str = "l2"
    ldm_label_dropout: float = 0.2
    ldm_ema: float = 0.0
    bf16: bool = True
    device: str = "auto"  # where each process trains and samples: "auto" (CUDA when visible), "cpu" or "cuda"
    # the synthetic set
    num_synthetic: int = 500
    sample_steps: int = 25
    sample_eta: float = 1.0  # Medfusion's default; η = 0 (deterministic DDIM) diverged on the cpu preset
    guidance_scale: float = 2.0
    sample_batch_size: int = 100
    # bf16 autocast while sampling: 2x faster on this CPU, but a different realisation of every image; on the cpu
    # preset it flagged 29 instead of 37 images and so changed the forget sets the unlearning rows start from.
    sample_bf16: bool = False
    # patient re-identification networks (retrieval + verification), trained on each hospital's real images
    reid_backbone: str = "small-cnn"
    reid_federated: bool = True  # FedAvg rounds; false = each hospital trains and keeps its own networks
    reid_rounds: int = 4
    reid_local_steps: int = 120
    reid_batch_size: int = 64
    reid_lr: float = 1e-3
    reid_eval_pairs: int = 1000  # same- and different-patient pairs each, for the held-out verification AUC
    # the audit of synthetic images at each hospital
    audit_threshold: float = 0.5  # the paper's operating point
    audit_top_k: int = 3
    audit_target_fpr: float = 0.0  # > 0: calibrate the threshold on unseen patients' autoencoded images instead
    deletion_requests: str = ""  # CSV (patient[, hospital]) of patients who asked to be forgotten
    # unlearning: methods run one after another, each from θ0, then re-audited on the same seeds
    unlearn_methods: str = "kl-away,siss,salun-kl-away,ga,finetune-remain"  # add "retrain" for the gold standard
    unlearn_rounds: int = 3
    unlearn_cycles: int = 1  # > 1: closed loop, audit → unlearn again with each hospital's grown forget set
    unlearn_local_steps: int = 20
    unlearn_batch_size: int = 32
    unlearn_lr: float = 1e-4
    unlearn_forget_weight: float = 1.0
    kl_cap: float = 1.0
    siss_lambda: float = 0.5
    siss_scaling_norm: float = 0.1
    saliency_fraction: float = 0.5
    # central evaluation: utility classifier (trained on each synthetic set; a FedAvg reference on real data) and FID
    classifier_backbone: str = "small-cnn"
    classifier_steps: int = 300  # training steps on a synthetic set
    classifier_rounds: int = 3  # FedAvg rounds of the real-data reference classifier
    classifier_local_steps: int = 100
    fid_inception_weights: str = ""  # local pt_inception weights file; empty: FID on domain features, named so
    catalog_method: str = "auto"  # the set the catalog is built from; auto: fewest flagged at a utility near θ0's
    # continue an interrupted run: the folder of that run (its manifest decides what is skipped)
    resume_from: str = ""
    # hospital failures: a phase goes on with the hospitals that answered, if at least min-hospitals did
    min_hospitals: int = 1
    reply_timeout_s: float = 0.0  # > 0: a hospital silent this long in a broadcast is counted as failed
    # fault injection, for tests and drills: hospital fail-hospital fails in phase fail-phase ("" = none)
    fail_hospital: int = -1
    fail_phase: str = ""
    fail_mode: str = "raise"  # raise (an error reply), exit (the process dies), hang (sleeps past the timeout)

    def __post_init__(self) -> None:
        self._check_choice("data-source", self.data_source, DATA_SOURCES)
        self._check_choice("partition-strategy", self.partition_strategy, PARTITION_STRATEGIES)
        self._check_choice("test-split", self.test_split, TEST_SPLITS)
        self._check_choice("label-policy", self.label_policy, LABEL_POLICIES)
        self._check_range("num-hospitals", self.num_hospitals, 1, None)
        self._check_range("seed", self.seed, 0, None)
        self._check_range("image-size", self.image_size, 16, 1024)
        self._check_range("dirichlet-alpha", self.dirichlet_alpha, 1e-6, None)
        self._check_range("test-fraction", self.test_fraction, 0.0, 0.9)
        self._check_range("hospital-patients", self.hospital_patients, 0, None)
        self._check_range("phantom-patients", self.phantom_patients, 1, None)
        self._check_range("phantom-prevalence", self.phantom_prevalence, 0.0, 1.0)
        self._check_range("phantom-max-images", self.phantom_max_images, 1, None)
        self._check_range("phantom-images-exponent", self.phantom_images_exponent, 0.0, None)
        self._check_range("wait-for-nodes-s", self.wait_for_nodes_s, 0.0, None)
        self._check_range("hospital-holdout-fraction", self.hospital_holdout_fraction, 0.0, 0.9)
        self._check_range("ldm-patients", self.ldm_patients, 0, None)
        for key in ("vae-rounds", "vae-local-steps", "ldm-rounds", "ldm-local-steps"):
            self._check_range(key, getattr(self, key.replace("-", "_")), 1, None)
        for key in ("vae-batch-size", "ldm-batch-size", "sample-batch-size", "vae-latent-channels",
                    "unet-layers-per-block", "sample-steps"):
            self._check_range(key, getattr(self, key.replace("-", "_")), 1, None)
        for key in ("vae-lr", "ldm-lr"):
            self._check_range(key, getattr(self, key.replace("-", "_")), 1e-12, 1.0)
        self._check_range("ldm-label-dropout", self.ldm_label_dropout, 0.0, 1.0)
        self._check_range("ldm-ema", self.ldm_ema, 0.0, 0.9999)
        self._check_range("num-synthetic", self.num_synthetic, 1, None)
        self._check_range("sample-eta", self.sample_eta, 0.0, 1.0)
        self._check_range("guidance-scale", self.guidance_scale, 0.0, None)
        self._check_choice("ldm-loss", self.ldm_loss, ("l1", "l2"))
        self._check_choice("vae-lr-schedule", self.vae_lr_schedule, ("constant", "one-cycle"))
        self._check_range("vae-hard-pixel-weight", self.vae_hard_pixel_weight, 0.0, None)
        self._check_choice("device", self.device, ("auto", "cpu", "cuda"))
        self._check_choice("reid-backbone", self.reid_backbone, ("small-cnn", "resnet18", "resnet50"))
        self._check_range("reid-rounds", self.reid_rounds, 1, None)
        self._check_range("reid-local-steps", self.reid_local_steps, 1, None)
        self._check_range("reid-batch-size", self.reid_batch_size, 4, None)
        self._check_range("reid-lr", self.reid_lr, 1e-12, 1.0)
        self._check_range("reid-eval-pairs", self.reid_eval_pairs, 1, None)
        self._check_range("audit-threshold", self.audit_threshold, 1e-6, 1.0)
        self._check_range("audit-top-k", self.audit_top_k, 1, None)
        self._check_range("audit-target-fpr", self.audit_target_fpr, 0.0, 0.5)
        self._check_choice("classifier-backbone", self.classifier_backbone, ("small-cnn", "resnet18", "densenet121"))
        for key in ("classifier-steps", "classifier-rounds", "classifier-local-steps"):
            self._check_range(key, getattr(self, key.replace("-", "_")), 1, None)
        self._check_range("min-hospitals", self.min_hospitals, 1, self.num_hospitals)
        self._check_range("reply-timeout-s", self.reply_timeout_s, 0.0, None)
        self._check_choice("fail-mode", self.fail_mode, ("raise", "exit", "hang"))
        for key in ("unlearn-rounds", "unlearn-cycles", "unlearn-local-steps", "unlearn-batch-size"):
            self._check_range(key, getattr(self, key.replace("-", "_")), 1, None)
        _ = self.unlearning  # validates the method hyperparameters
        _ = self.methods  # validates the method names
        if self.catalog_method not in ("auto", "original", *self.methods):
            raise ConfigError(f"catalog-method = {self.catalog_method!r} must be 'auto', 'original' or one of the run's "
                              f"unlearn-methods {list(self.methods)}")
        vae_channels = self._channels("vae-channels", self.vae_channels)
        unet_levels = len(self._channels("unet-channels", self.unet_channels)) - 1
        latent = self.image_size // 2 ** (len(vae_channels) - 1)
        if not self.image_size % 2 ** (len(vae_channels) - 1) and latent % 2 ** unet_levels:
            raise ConfigError(
                f"the {latent}×{latent} latents (image-size = {self.image_size}, vae-channels = '{self.vae_channels}') "
                f"cannot be downsampled {unet_levels} times by the UNet (unet-channels = '{self.unet_channels}'); "
                f"use an image-size whose latents are a multiple of {2 ** unet_levels}")
        if self.image_size % 2 ** (len(vae_channels) - 1):
            raise ConfigError(
                f"image-size = {self.image_size} cannot be downsampled {len(vae_channels) - 1} times by the "
                f"autoencoder (vae-channels = '{self.vae_channels}'); use a multiple of {2 ** (len(vae_channels) - 1)}"
            )
        if self.image_size % 8:
            raise ConfigError(f"image-size = {self.image_size} must be a multiple of 8 (the autoencoder downsamples by powers of 2)")
        if self.data_source != "phantom" and not self.data_root:
            raise ConfigError(f"data-source = '{self.data_source}' needs data-root: the local folder that holds the dataset")
        if not self.run_name or "/" in self.run_name or self.run_name.startswith("."):
            raise ConfigError(f"run-name = {self.run_name!r} must be a plain folder name")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's run config (kebab-case keys); unknown keys are an error."""
        by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in run_config.items():
            if key not in by_key:
                raise ConfigError(f"unknown run-config key '{key}'; known keys: {sorted(by_key)}")
            f = by_key[key]
            kwargs[f.name] = _coerce(key, value, f.type)
        return cls(**kwargs)

    def to_run_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ derived paths
    @property
    def run_dir(self) -> Path:
        """``<output-dir>/<run-name>``, or the folder given by ``resume-from``."""
        if self.resume_from:
            return Path(self.resume_from).expanduser().resolve()
        return Path(self.output_dir).expanduser().resolve() / self.run_name

    @property
    def torch_device(self) -> torch.device:
        """The device of this process (a hospital's Ray actor sees only the GPU share it was given)."""
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device = 'cuda' but this process sees no CUDA GPU (torch {torch.__version__}, "
                              f"CUDA build: {torch.version.cuda or 'no'}); use device = 'auto' or 'cpu'")
        return torch.device("cuda" if self.device != "cpu" and torch.cuda.is_available() else "cpu")

    @property
    def cache_path(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser().resolve()
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "fl-unlearn"

    # ------------------------------------------------------------------ model settings
    @property
    def vae(self):
        from fl_unlearn.models.diffusion import VAEConfig

        return VAEConfig(channels=self._channels("vae-channels", self.vae_channels),
                         latent_channels=self.vae_latent_channels)

    @property
    def unet(self):
        from fl_unlearn.models.diffusion import UNetConfig

        return UNetConfig(channels=self._channels("unet-channels", self.unet_channels),
                          layers_per_block=self.unet_layers_per_block, attention=self.unet_attention)

    @property
    def reid(self):
        from fl_unlearn.models.reid import ReIDConfig

        return ReIDConfig(backbone=self.reid_backbone, input_size=min(self.image_size, 256))

    @property
    def audit(self):
        from fl_unlearn.privacy.audit import AuditConfig

        return AuditConfig(threshold=self.audit_threshold, top_k=self.audit_top_k, target_fpr=self.audit_target_fpr)

    @property
    def unlearning(self):
        from fl_unlearn.unlearning.methods import UnlearnConfig

        return UnlearnConfig(steps=self.unlearn_local_steps, batch_size=self.unlearn_batch_size, lr=self.unlearn_lr,
                             forget_weight=self.unlearn_forget_weight, kl_cap=self.kl_cap,
                             siss_lambda=self.siss_lambda, siss_scaling_norm=self.siss_scaling_norm,
                             saliency_fraction=self.saliency_fraction, bf16=self.bf16)

    @property
    def methods(self) -> tuple[str, ...]:
        """The unlearning methods to run, in order (empty string: none)."""
        from fl_unlearn.unlearning.methods import ALL_METHODS

        names = tuple(m.strip() for m in self.unlearn_methods.split(",") if m.strip())
        unknown = [m for m in names if m not in ALL_METHODS]
        if unknown:
            raise ConfigError(f"unlearn-methods names unknown method(s) {unknown}; choose from {list(ALL_METHODS)}")
        if len(set(names)) != len(names):
            raise ConfigError(f"unlearn-methods lists a method twice: {self.unlearn_methods!r}")
        return names

    @property
    def noise_schedule(self):
        from fl_unlearn.models.diffusion import NoiseSchedule

        return NoiseSchedule()

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self._channels("vae-channels", self.vae_channels)) - 1)

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _channels(key: str, value: str) -> tuple[int, ...]:
        try:
            channels = tuple(int(c) for c in value.split(","))
        except ValueError:
            channels = ()
        if not channels or min(channels) < 1:
            raise ConfigError(f"{key} = {value!r} must be comma-separated positive integers, e.g. '32,64,64'")
        return channels

    @staticmethod
    def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
        if value not in choices:
            raise ConfigError(f"{key} = {value!r} is not one of {list(choices)}")

    @staticmethod
    def _check_range(key: str, value: float, low: float | None, high: float | None) -> None:
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"[{low}, {'∞' if high is None else high}]"
            raise ConfigError(f"{key} = {value} is outside {bounds}")


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    type_name = type_name if isinstance(type_name, str) else type_name.__name__
    try:
        if type_name == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError
        if type_name == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if type_name == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} = {value!r} is not a valid {type_name}") from None


def pyproject_defaults(pyproject: Path = PROJECT_ROOT / "pyproject.toml") -> dict[str, Any]:
    """The defaults in ``[tool.flwr.app.config]`` (what plain ``flwr run .`` uses)."""
    with open(pyproject, "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def load_preset(preset: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Fuse pyproject defaults, a preset (name in configs/ or a TOML path) and overrides, like ``flwr run``."""
    merged = pyproject_defaults()
    if preset:
        path = Path(preset)
        if not path.suffix:
            path = PRESET_DIR / f"{preset}.toml"
        if not path.is_file():
            known = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
            raise ConfigError(f"preset {str(preset)!r} not found (known presets: {known})")
        with open(path, "rb") as fh:
            layer = tomllib.load(fh)
        unknown = sorted(set(layer) - set(merged))
        if unknown:
            raise ConfigError(f"preset {path.name} sets unknown key(s) {unknown}")
        merged.update(layer)
    merged.update(overrides or {})
    return RunConfig.from_run_config(merged)
