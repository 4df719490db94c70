#!/usr/bin/env python3
"""The performance benchmarks, side by side on this machine, against the project's targets.

    python scripts/bench.py --run-dir runs/cpu          # a finished cpu run supplies the end-to-end figures
    python scripts/bench.py --run-dir runs/cpu --before-run-dir old/cpu   # and per phase against an older run
    python scripts/bench.py --tiny                       # seconds: the schema check the test suite runs

Writes ``benchmarks/results.json`` and ``benchmarks/results.md`` (``--out``). Sections:
1. end-to-end wall time per phase (from ``--run-dir``'s manifest); target ≤ 600 s on 2 cores;
2. federated overhead: the run's LDM phase (simulation, N hospitals) over the same number of local
   steps timed here in one process; target ≤ 1.15;
3. unlearning cost: each method's wall time and hospital-steps over retrain's (or, without a
   retrain row, over training θ0, which is what retraining costs); target ≤ 0.05 for KL-Away and SISS;
4. compute efficiency: UNet and VAE train-step GFLOP/s over the matmul rate of the same dtype; target ≥ 0.6;
5. audit scaling: top-k search of 4,000 synthetic embeddings among 1k/10k/100k real ones (one batched
   matrix product) against embedding those real images; target: search ≤ 10% of embedding at 100k;
6. memory: peak RSS (VmHWM) of one hospital process through a VAE, an LDM and a re-ID round; 10
   simulated hospitals share min(10, cores) Ray actor processes; target: 10 hospitals in 8 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import itertools

from fl_unlearn.config import load_preset
from fl_unlearn.io import write_json_atomic, write_text_atomic
from fl_unlearn.runs import library_versions
from scripts.bench_generative import matmul_gflops, time_step
from scripts.run import parallel_hospitals

TARGETS = {"pipeline_seconds": 600.0, "federated_overhead": 1.15, "unlearning_cost_ratio": 0.05,
           "fraction_of_matmul": 0.6, "search_over_embedding_at_100k": 0.10, "ten_hospitals_gb": 8.0}


def compute_efficiency(cfg, steps: int) -> dict:
    from fl_unlearn.models.diffusion import build_unet, build_vae, train_scheduler
    from fl_unlearn.training.common import autocast
    from fl_unlearn.training.ldm import noise_batch
    from fl_unlearn.training.vae import VAETrainConfig, vae_loss

    torch.manual_seed(0)
    rates = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    vae, unet = build_vae(cfg.vae, cfg.image_size), build_unet(cfg.unet, cfg.latent_size, cfg.vae.latent_channels)
    sched, gen = train_scheduler(cfg.noise_schedule), torch.Generator().manual_seed(0)
    x = torch.rand(cfg.vae_batch_size, 1, cfg.image_size, cfg.image_size) * 2 - 1
    z = torch.randn(cfg.ldm_batch_size, cfg.vae.latent_channels, cfg.latent_size, cfg.latent_size)
    y = torch.randint(0, 2, (cfg.ldm_batch_size,))
    optimisers = {"vae": torch.optim.AdamW(vae.parameters()), "unet": torch.optim.AdamW(unet.parameters())}
    out = {"matmul_gflops": {k: round(v, 1) for k, v in rates.items()}}
    for tag, bf16 in (("fp32", False), ("bf16", True)):
        def vae_step(bf16=bf16):
            with autocast(bf16):
                loss = vae_loss(vae, x, VAETrainConfig(), gen)["loss"]
            optimisers["vae"].zero_grad()
            loss.backward()
            optimisers["vae"].step()

        def unet_step(bf16=bf16):
            zt, t, eps = noise_batch(sched, z, gen)
            with autocast(bf16):
                loss = ((unet(zt, t, class_labels=y).sample.float() - eps) ** 2).mean()
            optimisers["unet"].zero_grad()
            loss.backward()
            optimisers["unet"].step()

        for name, step in (("vae", vae_step), ("unet", unet_step)):
            seconds, flops = time_step(step, steps)
            gflops = flops / seconds / 1e9
            out[f"{name}_{tag}"] = {"seconds_per_step": round(seconds, 4), "gflops": round(gflops, 1),
                                    "fraction_of_matmul": round(gflops / rates[tag], 3)}
    return out


def audit_scaling(sizes: list[int], queries: int, embed_images: int) -> dict:
    """Top-k search time per real-set size next to the time to embed that many real images."""
    from fl_unlearn.models.reid import ReIDNetworks
    from fl_unlearn.privacy.audit import nearest_neighbours
    from fl_unlearn.training.reid import embed

    cfg = load_preset("cpu")
    nets = ReIDNetworks(cfg.reid).eval()
    images = np.random.default_rng(0).integers(0, 255, (embed_images, cfg.image_size, cfg.image_size), np.uint8)
    embed(nets.retrieval, images[:8])
    start = time.perf_counter()
    embed(nets.retrieval, images)
    per_image = (time.perf_counter() - start) / embed_images
    rng = np.random.default_rng(1)
    q = rng.standard_normal((queries, 128)).astype(np.float32)
    rows, times = [], []
    for n in sizes:
        ref = rng.standard_normal((n, 128)).astype(np.float32)
        start = time.perf_counter()
        nearest_neighbours(q, ref, k=3)
        search = time.perf_counter() - start
        times.append(search)  # unrounded: a small search rounds to 0.000 s
        rows.append({"real": n, "search_s": round(search, 4), "embedding_s": round(per_image * n, 2),
                     "search_over_embedding": round(search / (per_image * n), 4)})
    growth = [tb / ta / (b / a) for (a, ta), (b, tb) in itertools.pairwise(zip(sizes, times, strict=True))]
    return {"queries": queries, "embedding_s_per_image": round(per_image, 5), "rows": rows,
            "growth_over_linear": [round(g, 2) for g in growth]}


MEMORY_PROBE = """
import json, resource, sys, torch
sys.path.insert(0, {root!r})
from fl_unlearn.config import load_preset
from fl_unlearn.models.diffusion import build_unet, build_vae, train_scheduler
from fl_unlearn.models.reid import ReIDNetworks
from fl_unlearn.data.sources import load_federation, hospital_split
from fl_unlearn.training.vae import VAETrainConfig, train_vae, encode_latents
from fl_unlearn.training.ldm import LDMTrainConfig, train_ldm
from fl_unlearn.training.reid import train_reid
torch.set_num_threads(1)
cfg = load_preset({preset!r}, {{"cache-dir": {cache!r}}})
cohort, plan = load_federation(cfg)
rows = hospital_split(cfg, plan.hospital_rows(cohort.table, 0), 0)
images = cohort.load_images(rows.train)
vae = build_vae(cfg.vae, cfg.image_size)
train_vae(vae, images, VAETrainConfig(steps={steps}, batch_size=cfg.vae_batch_size, bf16=cfg.bf16))
z = encode_latents(vae, cohort.load_images(rows.ldm))
unet = build_unet(cfg.unet, cfg.latent_size, cfg.vae_latent_channels)
train_ldm(unet, train_scheduler(cfg.noise_schedule), z.numpy() if hasattr(z, "numpy") else z,
          rows.ldm["label"].to_numpy(), LDMTrainConfig(steps={steps}, batch_size=cfg.ldm_batch_size, bf16=cfg.bf16))
train_reid(ReIDNetworks(cfg.reid), images, rows.train["patient"].to_numpy(), steps={steps},
           batch_size=cfg.reid_batch_size)
# VmHWM is this process's own peak: ru_maxrss survives fork and exec, so it would report the bench
# process's peak (the 100k-embedding audit) whenever that was higher.
try:
    peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"peak_rss_mb": peak}}))
"""


def memory_per_hospital(preset: str, steps: int, cache: str) -> dict:
    code = MEMORY_PROBE.format(root=str(ROOT), preset=preset, steps=steps, cache=cache)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    # Ray runs simulated hospitals in a pool of actor processes, as many as the launcher gives it slots
    # (scripts/run.py: all hospitals up to twice the cores, else one per core), not one per hospital.
    actors = parallel_hospitals(10, os.cpu_count() or 1)
    return {"preset": preset, "peak_rss_mb": round(peak, 1), "actors_for_ten": actors,
            "ten_hospitals_gb": round(actors * peak / 1024, 2),
            "ten_processes_gb": round(10 * peak / 1024, 2)}


def from_run(run_dir: Path, central_steps: int) -> dict:
    """Per-phase wall time, federated overhead of the LDM phase, and unlearning cost against retraining."""
    from fl_unlearn.config import RunConfig
    from fl_unlearn.models.diffusion import build_unet, train_scheduler
    from fl_unlearn.training.ldm import LDMTrainConfig, train_ldm

    manifest = json.loads((run_dir / "manifest.json").read_text())
    phases = {k: v.get("seconds") for k, v in manifest["phases"].items()}
    cfg = RunConfig.from_run_config({**manifest["run_config"], "resume-from": str(run_dir)})
    ldm = manifest["phases"]["train-ldm"]
    hospital_steps = sum(len(r["hospitals"]) for r in ldm["history"]) * cfg.ldm_local_steps
    simulated = sum(r["seconds"] for r in ldm["history"]) / hospital_steps
    torch.manual_seed(0)
    unet = build_unet(cfg.unet, cfg.latent_size, cfg.vae_latent_channels)
    z = np.random.default_rng(0).standard_normal((200, cfg.vae_latent_channels, cfg.latent_size, cfg.latent_size))
    result = train_ldm(unet, train_scheduler(cfg.noise_schedule), z.astype(np.float32), np.arange(200) % 2,
                       LDMTrainConfig(steps=central_steps, batch_size=cfg.ldm_batch_size, lr=cfg.ldm_lr, bf16=cfg.bf16))
    central = result["seconds"] / central_steps
    rows = {m: manifest["phases"][f"unlearn-{m}"] for m in cfg.methods
            if manifest["phases"].get(f"unlearn-{m}", {}).get("status") == "completed"}
    reference = rows.get("retrain", {}).get("cost") or {
        "seconds": sum(r["seconds"] for r in ldm["history"]), "hospital_steps": hospital_steps}
    cost = {m: {"seconds_ratio": round(e["cost"]["seconds"] / reference["seconds"], 4),
                "hospital_steps_ratio": round(e["cost"]["hospital_steps"] / reference["hospital_steps"], 4)}
            for m, e in rows.items() if m != "retrain"}
    return {"run": str(run_dir), "phases_seconds": phases, "pipeline_seconds": round(sum(v or 0 for v in phases.values()), 1),
            "federated_overhead": {"simulated_s_per_hospital_step": round(simulated, 4),
                                   "central_s_per_step": round(central, 4), "ratio": round(simulated / central, 3),
                                   "central_steps": central_steps},
            "unlearning_cost": {"reference": "retrain" if "retrain" in rows else "training θ0", **cost}}


def phase_seconds(run_dir: Path) -> dict[str, float]:
    """Wall seconds of each phase of a finished run, from its manifest."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {k: v["seconds"] for k, v in manifest["phases"].items() if v.get("seconds") is not None}


def before_after(before: dict[str, float], after: dict[str, float]) -> dict:
    """Per-phase wall time of two runs of the same preset (e.g. an older commit's and this one's)."""
    phases = [*after, *(k for k in before if k not in after)]
    rows = [{"phase": k, "before_s": before.get(k), "after_s": after.get(k),
             "after_over_before": round(after[k] / before[k], 3) if before.get(k) and k in after else None}
            for k in phases]
    total_before, total_after = round(sum(before.values()), 1), round(sum(after.values()), 1)
    return {"phases": rows, "before_s": total_before, "after_s": total_after,
            "after_over_before": round(total_after / total_before, 3) if total_before else None}


def before_after_markdown(comparison: dict, before: str, after: str) -> str:
    fmt = lambda v: "–" if v is None else f"{v:g}"
    lines = [f"Before: `{before}`; after: `{after}`.", "", "| phase | before (s) | after (s) | after / before |",
             "|---|---|---|---|"]
    lines += [f"| {r['phase']} | {fmt(r['before_s'])} | {fmt(r['after_s'])} | {fmt(r['after_over_before'])} |"
              for r in comparison["phases"]]
    lines.append(f"| **pipeline** | {comparison['before_s']:g} | {comparison['after_s']:g} | "
                 f"{fmt(comparison['after_over_before'])} |")
    return "\n".join(lines) + "\n"


def markdown(results: dict) -> str:
    lines = [(f"# Benchmarks ({results['machine']['cpu']}, {results['machine']['cores']} cores, "
             f"torch {results['versions']['torch']})"), "", "| measure | value | target | met |", "|---|---|---|---|"]

    def row(name, value, target, met):
        lines.append(f"| {name} | {value} | {target} | {'yes' if met else 'no'} |")

    run = results.get("run")
    if run:
        row("end-to-end pipeline (s)", run["pipeline_seconds"], f"≤ {TARGETS['pipeline_seconds']:.0f}",
            run["pipeline_seconds"] <= TARGETS["pipeline_seconds"])
        o = run["federated_overhead"]
        row("federated overhead (LDM, simulated / central per step)", o["ratio"], "≤ 1.15", o["ratio"] <= 1.15)
        for m, c in run["unlearning_cost"].items():
            if m != "reference":
                target = m in ("kl-away", "siss")
                row(f"{m} cost / {run['unlearning_cost']['reference']} (s; hospital-steps)",
                    f"{c['seconds_ratio']}; {c['hospital_steps_ratio']}", "≤ 0.05" if target else "–",
                    not target or c["seconds_ratio"] <= 0.05)
    ce = results["compute"]
    for key in ("vae_fp32", "vae_bf16", "unet_fp32", "unet_bf16"):
        row(f"{key} GFLOP/s over matmul", ce[key]["fraction_of_matmul"], "≥ 0.6", ce[key]["fraction_of_matmul"] >= 0.6)
    last = results["audit"]["rows"][-1]
    row(f"audit search / embedding at {last['real']} real", last["search_over_embedding"], "≤ 0.10",
        last["search_over_embedding"] <= 0.10)
    m = results["memory"]
    row(f"10 simulated hospitals' peak RSS (GB; {m['actors_for_ten']} Ray actors of {m['peak_rss_mb']:.0f} MB)",
        m["ten_hospitals_gb"], "≤ 8", m["ten_hospitals_gb"] <= 8.0)
    row("10 hospitals as 10 processes (deployment on one host; GB)", m["ten_processes_gb"], "–", True)
    if "before_after" in results:
        lines += ["", "## Before and after, per phase", "",
                  before_after_markdown(results["before_after"], results["before_after"]["before_run"], run["run"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=None, help="a finished run: end-to-end, overhead and unlearning cost")
    parser.add_argument("--tiny", action="store_true", help="small sizes: checks the script and its schema")
    parser.add_argument("--before-run-dir", default=None,
                        help="with --run-dir: a finished run of the same preset by older code, compared phase by phase")
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    parser.add_argument("--cache-dir", default="")
    args = parser.parse_args(argv)
    tiny = args.tiny
    preset = "test" if tiny else "cpu"
    cfg = load_preset(preset)
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
                           "platform": platform.platform()},
               "versions": library_versions(), "targets": TARGETS, "tiny": tiny}
    results["compute"] = compute_efficiency(cfg, steps=1 if tiny else 10)
    results["audit"] = audit_scaling([100, 1000] if tiny else [1000, 10_000, 100_000], queries=200 if tiny else 4000,
                                     embed_images=64 if tiny else 512)
    cache = args.cache_dir or str(cfg.cache_path)
    results["memory"] = memory_per_hospital(preset, steps=2 if tiny else 20, cache=cache)
    if args.run_dir:
        results["run"] = from_run(Path(args.run_dir), central_steps=5 if tiny else 100)
        if args.before_run_dir:
            results["before_after"] = {"before_run": str(Path(args.before_run_dir)), **before_after(
                phase_seconds(Path(args.before_run_dir)), phase_seconds(Path(args.run_dir)))}
    results["peak_rss_mb_bench"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out = Path(args.out)
    write_json_atomic(out / "results.json", results)
    table = markdown(results)
    write_text_atomic(out / "results.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
