"""Phases of unlearning: one per method (unlearn from θ0, regenerate on the same seeds, re-audit), then the table.

Each method starts from θ0 and runs ``unlearn-rounds`` FedAvg rounds: hospitals with forget
patients use forget + remain loss, the others the remain loss only. ``retrain`` trains a fresh LDM
on D_r for as many rounds as the original (exact unlearning, the gold standard and cost yardstick).
"""

from __future__ import annotations

import json
from functools import partial

import pandas as pd
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fl_unlearn.checkpoint import load_checkpoint, save_checkpoint
from fl_unlearn.models.diffusion import build_unet, sampling_scheduler
from fl_unlearn.pipeline import generate_images
from fl_unlearn.privacy.metrics import unlearning_summary
from fl_unlearn.runs import RunDirectory
from fl_unlearn.unlearning import saliency_mask
from server.federation import Federation
from server.generative import load_latent_stats, load_vae, sampler_config, save_synthetic_set
from server.privacy import audit_set
from server.rounds import fedavg_rounds


def _salun_mask(federation: Federation, run: RunDirectory, theta0: dict, latent_config: dict) -> dict:
    """Federated SalUn mask: hospitals send summed clipped forget gradients at θ0; the server keeps the global top."""
    cfg = run.config
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=theta0), "config": ConfigRecord(latent_config)})
    replies = federation.send_to_hospitals("query.saliency", content)
    if replies.errors or replies.missing:
        raise RuntimeError(f"saliency: hospitals failed: errors={replies.errors} missing={replies.missing}")
    total: dict[str, torch.Tensor] = {}
    for _, reply in sorted(replies.ok.items()):
        if "scores" in reply.content.array_records:
            for k, v in reply.content["scores"].to_torch_state_dict().items():
                total[k] = total[k] + v if k in total else v.clone()
    if not total:  # nobody has a forget set: nothing is salient, nothing may change
        return {k: torch.zeros_like(v, dtype=torch.bool) for k, v in theta0.items()}
    mask = saliency_mask(total, cfg.saliency_fraction)
    # buffers (none in the UNet today) are never masked in: only parameters had gradients
    return {k: mask.get(k, torch.zeros_like(v, dtype=torch.bool)) for k, v in theta0.items()}


def unlearn_method(method: str, federation: Federation, run: RunDirectory) -> dict:
    """Unlearn with ``method`` from θ0, regenerate the synthetic set on the same seeds, and audit it again."""
    cfg = run.config
    theta0, _ = load_checkpoint(run.file("checkpoints", "unet.safetensors"))
    stats = load_latent_stats(run)
    latent_config = {"latent-mean": list(stats.mean), "latent-std": list(stats.std)}
    extra, rounds, initial = {}, cfg.unlearn_rounds, theta0
    if method == "retrain":
        torch.manual_seed(cfg.seed + 1)  # the original's initialisation, so only the data differ
        initial = {k: v.detach().clone()
                   for k, v in build_unet(cfg.unet, cfg.latent_size, cfg.vae_latent_channels).state_dict().items()}
        rounds = cfg.ldm_rounds
    elif method == "salun-kl-away":
        mask = _salun_mask(federation, run, theta0, latent_config)
        save_checkpoint(run.file("checkpoints", "salun-mask.safetensors"), {k: v.to(torch.uint8) for k, v in mask.items()},
                        {"fraction": cfg.saliency_fraction})
        extra["mask"] = ArrayRecord(torch_state_dict={k: v.to(torch.uint8) for k, v in mask.items()})
    phase = f"unlearn-{method}"
    result = fedavg_rounds(federation, run, phase=phase, rounds=rounds, initial=initial,
                           checkpoint=run.file("checkpoints", f"unet-{method}.safetensors"),
                           config={"method": method, **latent_config}, extra=extra, meta={"method": method})
    history = result["history"]
    cost = {"seconds": round(sum(r["seconds"] for r in history), 1),
            "hospital_steps": int(sum(m.get("steps", 0) for r in history for m in r["hospitals"].values()))}

    vae = load_vae(run)
    unet = build_unet(cfg.unet, cfg.latent_size, cfg.vae_latent_channels)
    unet.load_state_dict(result["global"])
    # The original set's labels and seeds: image i after unlearning is paired with image i before.
    index = pd.read_csv(run.file("synthetic", "original", "index.csv"))
    sampler = sampler_config(cfg)
    labels, seeds = index["label"].to_numpy(), index["seed"].to_numpy()
    images = generate_images(vae, unet.eval(), sampling_scheduler(cfg.noise_schedule), stats, labels, seeds, sampler)
    save_synthetic_set(run, method, images, labels, seeds, sampler)
    after = audit_set(federation, run, method)
    return {**_row(run, after), "cost": cost}


def _row(run: RunDirectory, after: dict) -> dict:
    """Table-1 columns of one re-audit against the original audit (paired by seed)."""
    before = json.loads(run.file("audit", "original.json").read_text())
    flags_before = pd.read_csv(run.file("audit", "original.csv"))["non_anonymous"].to_numpy(bool)
    flags_after = pd.read_csv(run.file("audit", f"{after['set']}.csv"))["non_anonymous"].to_numpy(bool)
    forget = {(h, t) for h, tokens in before["forget_tokens"].items() for t in tokens}
    linked = {(h, t) for h, tokens in after["linked_tokens"].items() for t in tokens}
    o = after["overall"]
    return {"non_anon": o["non_anon"], "oda": o["oda"], "pir": o["pir"], "patients_linked": o["patients_linked"],
            **unlearning_summary(forget, linked, flags_before, flags_after),
            "control_rate_max": o["control_rate_max"]}


def table_rows(run: RunDirectory) -> list[dict]:
    """Table-1 privacy columns: Original, then each completed method with its cost."""
    original = json.loads(run.file("audit", "original.json").read_text())
    o = original["overall"]
    # The original row's cost is what training θ0 took: what retraining on D_r costs, the yardstick.
    trained = run.manifest["phases"]["train-ldm"].get("history", [])
    rows = [{"method": "original", "non_anon": o["non_anon"], "ua": None, "ua_image": None, "oda": o["oda"],
             "pir": o["pir"], "patients_linked": o["patients_linked"], "newly_exposed": None,
             "control_fp": 100 * o["control_rate_max"], "seconds": round(sum(r["seconds"] for r in trained), 1),
             "hospital_steps": len(trained) * run.config.ldm_local_steps * run.config.num_hospitals}]
    for method in run.config.methods:
        entry = run.manifest["phases"].get(f"unlearn-{method}", {})
        if entry.get("status") != "completed":
            continue
        rows.append({"method": method, **{k: entry[k] for k in ("non_anon", "ua", "ua_image", "oda", "pir",
                                                                   "patients_linked", "newly_exposed")},
                     "control_fp": 100 * entry["control_rate_max"], **entry["cost"]})
    return rows


def method_phases(methods: tuple[str, ...]) -> list[tuple[str, object]]:
    return [(f"unlearn-{m}", partial(unlearn_method, m)) for m in methods]
