"""The latent diffusion model's parts, built from diffusers: AutoencoderKL, a class-conditional UNet2DModel, schedulers."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DModel

#: Class indices of the UNet's label embedding: 0/1 = cardiomegaly negative/positive, 2 = "no label" for guidance.
NULL_CLASS = 2


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL for 1-channel radiographs; ``len(channels) - 1`` halvings of the image size."""

    channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 8
    layers_per_block: int = 1
    norm_groups: int = 8
    mid_attention: bool = False

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class UNetConfig:
    """Class-conditional UNet2DModel on the latents (label added to the time embedding, as in Medfusion)."""

    channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    norm_groups: int = 16
    attention: bool = False


@dataclass(frozen=True)
class NoiseSchedule:
    """Medfusion's schedule: 1000 steps, scaled-linear β from 0.002 to 0.02."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.002
    beta_end: float = 0.02
    beta_schedule: str = "scaled_linear"


def build_vae(config: VAEConfig, image_size: int) -> AutoencoderKL:
    n = len(config.channels)
    return AutoencoderKL(
        in_channels=1, out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(config.channels), layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels, norm_num_groups=config.norm_groups, sample_size=image_size,
        mid_block_add_attention=config.mid_attention,
        # Latents are standardised by our own per-channel statistics, not SD's constant.
        scaling_factor=1.0,
    )


def build_unet(config: UNetConfig, latent_size: int, latent_channels: int) -> UNet2DModel:
    n = len(config.channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if config.attention:  # attention at the coarsest resolution only, where it is cheap
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=tuple(config.channels), layers_per_block=config.layers_per_block,
        down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=config.norm_groups,
        add_attention=config.attention, num_class_embeds=NULL_CLASS + 1,
    )


def train_scheduler(schedule: NoiseSchedule) -> DDPMScheduler:
    return DDPMScheduler(**asdict(schedule), prediction_type="epsilon", clip_sample=False)


def sampling_scheduler(schedule: NoiseSchedule) -> DDIMScheduler:
    # clip_sample=False: DDIM clips to [-1, 1] by default, which destroys latents.
    return DDIMScheduler(**asdict(schedule), prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False)
