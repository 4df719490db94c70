"""Phases of unlearning: one per method (unlearn from θ0, regenerate on the same seeds, re-audit), then the table.

Each method starts from θ0 and runs ``unlearn-rounds`` FedAvg rounds: hospitals with forget
patients use forget + remain loss, the others the remain loss only. ``retrain`` trains a fresh LDM
on D_r for as many rounds as the original (exact unlearning, the gold standard and cost yardstick).
With ``unlearn-cycles`` > 1, audit → unlearn repeats with each hospital's grown forget set.
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
from fl_unlearn.privacy.metrics import newly_exposed, ua, unlearning_summary
from fl_unlearn.runs import RunDirectory
from fl_unlearn.unlearning import saliency_mask
from server import ledger
from server.federation import Federation
from server.generative import load_latent_stats, load_vae, sampler_config, save_synthetic_set
from server.privacy import audit_set
from server.rounds import fedavg_rounds


def _salun_mask(federation: Federation, run: RunDirectory, start: dict, config: dict) -> dict:
    """Federated SalUn mask: hospitals send summed clipped forget gradients at ``start`` (θ0 of the cycle);
    the server keeps the global top ``saliency-fraction``."""
    cfg = run.config
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=start), "config": ConfigRecord(config)})
    ok = federation.usable(federation.send_to_hospitals("query.saliency", content), "saliency")
    total: dict[str, torch.Tensor] = {}
    for _, reply in sorted(ok.items()):
        if "scores" in reply.content.array_records:
            for k, v in reply.content["scores"].to_torch_state_dict().items():
                total[k] = total[k] + v if k in total else v.clone()
    if not total:  # nobody has a forget set: nothing is salient, nothing may change
        return {k: torch.zeros_like(v, dtype=torch.bool) for k, v in start.items()}
    mask = saliency_mask(total, cfg.saliency_fraction)
    # buffers (none in the UNet today) are never masked in: only parameters had gradients
    return {k: mask.get(k, torch.zeros_like(v, dtype=torch.bool)) for k, v in start.items()}


def _regenerate_and_audit(federation: Federation, run: RunDirectory, vae, state: dict, name: str,
                          grow: dict | None = None) -> dict:
    """Sample set ``name`` from ``state`` on the original set's seeds and labels, and have the hospitals audit it.

    ``grow`` (``{"forget-set": method, "grow-from": set}``) makes each hospital add the patients this
    audit links to that forget set, for the next cycle.
    """
    cfg = run.config
    stats = load_latent_stats(run)
    unet = build_unet(cfg.unet, cfg.latent_size, cfg.vae_latent_channels)
    unet.load_state_dict(state)
    # The original set's labels and seeds: image i after unlearning is paired with image i before.
    index = pd.read_csv(run.file("synthetic", "original", "index.csv"))
    sampler = sampler_config(cfg)
    labels, seeds = index["label"].to_numpy(), index["seed"].to_numpy()
    unet.to(cfg.torch_device).eval()
    images = generate_images(vae, unet, sampling_scheduler(cfg.noise_schedule), stats, labels, seeds, sampler)
    save_synthetic_set(run, name, images, labels, seeds, sampler)
    return audit_set(federation, run, name, grow=grow)


def cycle_set(method: str, cycle: int, cycles: int) -> str:
    """The synthetic set after ``cycle`` of ``cycles``: the last one carries the method's name (its table row)."""
    return method if cycle == cycles else f"{method}-cycle{cycle}"


def unlearn_method(method: str, federation: Federation, run: RunDirectory) -> dict:
    """Unlearn with ``method`` from θ0, regenerate the synthetic set on the same seeds, and audit it again.

    With ``unlearn-cycles`` K > 1 this is a closed loop: after each cycle of ``unlearn-rounds`` rounds
    the regenerated set is audited, each hospital adds the patients it now links (identities the
    first audit did not see, exposed by unlearning) to its forget set, and the next cycle unlearns
    the grown set starting from the current model (its θ0 for KL-Away and SalUn's mask).
    """
    cfg = run.config
    original = _audit(run, "original")
    if original.get("missed"):  # a hospital missed the audit: its requests and findings are retried here
        print(f"[fl-unlearn] {method}: auditing the original set again for {', '.join(original['missed'])}, "
              f"which missed it", flush=True)
        ledger.record_forget_sets(run, "original", audit_set(federation, run, "original"), previous=original,
                                  retry=method)
    theta0, _ = load_checkpoint(run.file("checkpoints", "unet.safetensors"))
    stats = load_latent_stats(run)
    latent_config = {"latent-mean": list(stats.mean), "latent-std": list(stats.std)}
    rounds, initial, cycles = cfg.unlearn_rounds, theta0, cfg.unlearn_cycles
    if method == "retrain":
        torch.manual_seed(cfg.seed + 1)  # the original's initialisation, so only the data differ
        initial = {k: v.detach().clone()
                   for k, v in build_unet(cfg.unet, cfg.latent_size, cfg.vae_latent_channels).state_dict().items()}
        rounds, cycles = cfg.ldm_rounds, 1  # exact unlearning has nothing left to expose
    mask_record: dict[str, ArrayRecord] = {}
    vae = load_vae(run)  # once per method: every cycle's regeneration decodes with it

    def before_round(rnd: int, state: dict) -> tuple[dict, dict]:
        cycle, position = divmod(rnd - 1, rounds)
        cycle += 1
        forget_set = "original" if cycle == 1 else method
        if position == 0 and cycle > 1:  # close the previous cycle (again, after a resume: it is deterministic)
            before = _audit(run, "original" if cycle == 2 else cycle_set(method, cycle - 2, cycles))
            after = _regenerate_and_audit(federation, run, vae, state, cycle_set(method, cycle - 1, cycles),
                                          grow={"forget-set": method, "grow-from": "original" if cycle == 2 else method})
            if _forget_pairs(after) <= _forget_pairs(before):
                # Nobody new was exposed: another cycle would unlearn the same patients again from a model
                # that already forgot them, which on the cpu run re-exposed others (KL-Away: 2 → 22 images).
                print(f"[fl-unlearn] {method}: cycle {cycle - 1} exposed nobody new; the closed loop stops", flush=True)
                return None
        config = {"cycle": cycle, "cycle-round": position + 1, "forget-set": forget_set}
        if method == "salun-kl-away":
            path = run.file("checkpoints", f"salun-mask-cycle{cycle}.safetensors")
            if position == 0 or not mask_record:  # computed at the cycle's start; read back after a resume
                if position == 0:
                    mask = _salun_mask(federation, run, state, {**latent_config, "forget-set": forget_set})
                    save_checkpoint(path, {k: v.to(torch.uint8) for k, v in mask.items()},
                                    {"fraction": cfg.saliency_fraction, "cycle": cycle})
                mask_record["mask"] = ArrayRecord(torch_state_dict=load_checkpoint(path)[0])
        return config, dict(mask_record)

    phase = f"unlearn-{method}"
    result = fedavg_rounds(federation, run, phase=phase, rounds=rounds * cycles, initial=initial,
                           checkpoint=run.file("checkpoints", f"unet-{method}.safetensors"),
                           config={"method": method, **latent_config}, meta={"method": method},
                           before_round=before_round)
    history = result["history"]
    cycles = -(-len(history) // rounds)  # the cycles that ran: the loop stops when nobody new is exposed
    cost = {"seconds": round(sum(r["seconds"] for r in history), 1),
            "hospital_steps": int(sum(m.get("steps", 0) for r in history for m in r["hospitals"].values()))}
    after = _regenerate_and_audit(federation, run, vae, result["global"], method)
    _record_in_ledger(run, method, cycles, rounds, history)
    details = {**_row(run, after), "cost": cost}
    if cfg.unlearn_cycles > 1 and method != "retrain":
        details["cycles"] = [_cycle_entry(run, method, c, cycles) for c in range(1, cycles + 1)]
    return details


def _audit(run: RunDirectory, name: str) -> dict:
    return json.loads(run.file("audit", f"{name}.json").read_text())


def _record_in_ledger(run: RunDirectory, method: str, cycles: int, rounds: int, history: list[dict]) -> None:
    """Per cycle: what it unlearned and the re-audit's outcome, then who that re-audit added to the forget set."""
    for cycle in range(1, cycles + 1):
        unlearned = _audit(run, "original" if cycle == 1 else cycle_set(method, cycle - 1, cycles))
        name = cycle_set(method, cycle, cycles)
        after = _audit(run, name)
        trained = {site for r in history if (r["round"] - 1) // rounds + 1 == cycle for site in r["hospitals"]}
        ledger.record_cycle(run, method, cycle, rounds, unlearned, name, after, trained)
        if cycle < cycles:
            ledger.record_forget_sets(run, name, after, previous=unlearned, method=method, cycle=cycle)


def _forget_pairs(audit: dict) -> set:
    return {(h, t) for h, tokens in audit["forget_tokens"].items() for t in tokens}


def _cycle_entry(run: RunDirectory, method: str, cycle: int, cycles: int) -> dict:
    """One cycle of the closed loop: its audit, and UA / newly exposed against the forget set it unlearned."""
    name = cycle_set(method, cycle, cycles)
    audit = _audit(run, name)
    forget = _forget_pairs(_audit(run, "original" if cycle == 1 else cycle_set(method, cycle - 1, cycles)))
    linked = {(h, t) for h, tokens in audit["linked_tokens"].items() for t in tokens}
    o = audit["overall"]
    return {"cycle": cycle, "set": name, "non_anon": o["non_anon"], "oda": o["oda"], "pir": o["pir"],
            "patients_linked": o["patients_linked"], "forget_patients": len(forget),
            "ua": ua(forget, linked), "newly_exposed": len(newly_exposed(forget, linked))}


def _row(run: RunDirectory, after: dict) -> dict:
    """Table-1 columns of one re-audit against the original audit (paired by seed)."""
    before = json.loads(run.file("audit", "original.json").read_text())
    flags_before = pd.read_csv(run.file("audit", "original.csv"))["non_anonymous"].to_numpy(bool)
    flags_after = pd.read_csv(run.file("audit", f"{after['set']}.csv"))["non_anonymous"].to_numpy(bool)
    forget = _forget_pairs(before)
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
