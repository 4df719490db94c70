"""Pieces every training loop shares: seeding, batching, bf16 autocast, pixel <-> tensor conversion."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
from collections.abc import Iterator

import numpy as np
import torch

from fl_unlearn.errors import ConfigError


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model`` lives; every loop moves its batches there (random numbers stay on the CPU, so a
    seed gives the same draws on any device)."""
    return next(model.parameters()).device


def release_memory() -> None:
    """Hand cached GPU memory back between phases: a simulated hospital's Ray actor outlives its models,
    and hospitals sharing one GPU need the room in turn. A no-op on the CPU."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def autocast(enabled: bool, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast (1.4x faster on this CPU for the UNet); a no-op when disabled."""
    device_type = torch.device(device).type
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def one_cycle(step: int, total: int, *, pct_start: float = 0.15, div: float = 25.0, final_div: float = 1e4) -> float:
    """The learning-rate factor of torch's ``OneCycleLR`` (cosine, its defaults) at ``step`` of ``total``.

    Written out so that FedAvg rounds can continue one schedule: round r's local steps are steps
    ``(r-1)·k … r·k-1`` of a cycle over all rounds, not a fresh warm-up and anneal every round.
    """
    warm = float(pct_start * total) - 1
    def cos(a: float, b: float, frac: float) -> float:  # a Python float: it lands in the optimizer's state dict
        return b + (a - b) / 2.0 * (math.cos(math.pi * frac) + 1)
    if step <= warm:
        return cos(1 / div, 1.0, step / warm) if warm > 0 else 1.0
    return cos(1.0, 1 / (div * final_div), (step - warm) / max(total - 1 - warm, 1e-12))


def cycle_lrs(lr: float, steps: int, start_step: int = 0, total_steps: int | None = None) -> list[float]:
    """The learning rate of each of ``steps`` steps that are steps ``start_step …`` of one one-cycle
    schedule over ``total_steps`` (default: these steps alone), as FedAvg rounds continue it."""
    total = steps if total_steps is None else total_steps
    if steps < 1 or not 0 <= start_step <= total - steps:
        raise ConfigError(f"steps must be >= 1 and fit in the schedule: steps {steps}, start {start_step}, total {total}")
    return [lr * one_cycle(start_step + i, total) for i in range(steps)]


def batch_indices(n: int, batch_size: int, steps: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """``steps`` batches drawn epoch by epoch without replacement (a batch never exceeds ``n``)."""
    if n == 0:
        raise ValueError("cannot train on an empty set")
    batch_size = min(batch_size, n)
    order = rng.permutation(n)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = rng.permutation(n), 0
        yield order[pos: pos + batch_size]
        pos += batch_size


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N,H,W] → float [N,1,H,W] in [-1, 1], the range the autoencoder works in."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    return (x.float().unsqueeze(1) / 127.5) - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [N,1,H,W] in [-1, 1] → uint8 [N,H,W] (clipped, rounded)."""
    return ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).squeeze(1).cpu().numpy()


def derived_seed(*parts: int | str) -> int:
    """A seed for one (phase, round, hospital): same inputs, same seed, whether or not a run was resumed."""
    digest = np.random.SeedSequence([abs(hash_text(str(p))) for p in parts]).generate_state(1)[0]
    return int(digest)


def hash_text(text: str) -> int:
    # Python's hash() is salted per process; this one is stable across processes and machines.
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
