"""Phases of the privacy audit: federated re-identification networks, and the audit of a synthetic set.

The server never sees a real image or a patient id: it receives weights, scores, flags, salted
tokens (which it can count and compare across audits, not invert) and counts.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from rich.console import Console
from rich.table import Table

from fl_unlearn.data.partition import hospital_name
from fl_unlearn.io import write_json_atomic, write_text_atomic
from fl_unlearn.models.reid import ReIDNetworks
from fl_unlearn.privacy.metrics import linked_patients, pooled_control, pooled_links, summary
from fl_unlearn.runs import RunDirectory
from server import ledger
from server.federation import Federation
from server.generative import load_synthetic_set
from server.rounds import fedavg_rounds

console = Console(width=140, force_terminal=False)

#: Verification AUC on held-out patients below which the audit's numbers mean little (issue acceptance).
MIN_VERIFICATION_AUC = 0.95


def train_reid(federation: Federation, run: RunDirectory) -> dict:
    """FedAvg rounds of both re-ID networks (or local-only training), then each hospital keeps and measures them."""
    cfg = run.config
    content = RecordDict({"config": ConfigRecord({"phase": "train-reid"})})
    if cfg.reid_federated:
        torch.manual_seed(cfg.seed + 2)
        initial = {k: v.detach().clone() for k, v in ReIDNetworks(cfg.reid).state_dict().items()}
        result = fedavg_rounds(federation, run, phase="train-reid", rounds=cfg.reid_rounds, initial=initial,
                               checkpoint=run.file("checkpoints", "reid.safetensors"), config={},
                               meta={"backbone": cfg.reid_backbone})
        content["arrays"] = ArrayRecord(torch_state_dict=result["global"])
    ok = federation.usable(federation.send_to_hospitals("evaluate", content), "keep and evaluate")
    reports = {hospital_name(h): {k: float(v) for k, v in m.content["metrics"].items()} for h, m in sorted(ok.items())}
    run.set("reid", {"backbone": cfg.reid_backbone, "federated": cfg.reid_federated, "hospitals": reports})
    _print_reid(reports)
    weak = [h for h, r in reports.items() if r["verification_auc"] < MIN_VERIFICATION_AUC]
    if weak:
        print(f"[fl-unlearn] WARNING: verification AUC below {MIN_VERIFICATION_AUC} at {', '.join(weak)}: "
              f"the audit there is unreliable; train the re-identification networks longer", flush=True)
    return {"verification_auc": {h: round(r["verification_auc"], 4) for h, r in reports.items()}}


def _print_reid(reports: dict) -> None:
    table = Table(title="Re-identification networks on each hospital's held-out patients")
    columns = [("patients", "holdout-patients", "{:.0f}"), ("images", "holdout-images", "{:.0f}"),
               ("verif. AUC", "verification_auc", "{:.4f}"), ("AUC (autoenc. visit)", "verification_auc_degraded",
                                                               "{:.4f}"),
               ("retrieval P@1", "retrieval_precision_at_1", "{:.3f}"), ("mAP@R", "retrieval_map_at_r", "{:.3f}")]
    table.add_column("site")
    for title, _, _ in columns:
        table.add_column(title, justify="right")
    for site, r in reports.items():
        table.add_row(site, *(fmt.format(r[key]) if key in r else "–" for _, key, fmt in columns))
    console.print(table)


def audit_set(federation: Federation, run: RunDirectory, name: str, grow: dict | None = None) -> dict:
    """Every hospital audits synthetic set ``name``; pool: an image is non-anonymous if any hospital flags it.

    ``grow`` (``{"forget-set": method, "grow-from": set}``): each hospital also adds the patients it
    links here to a forget set for the next unlearning cycle, and replies its tokens.
    """
    images, index = load_synthetic_set(run, name)
    content = RecordDict({"synthetic": ArrayRecord({"images": Array(images)}),
                          "config": ConfigRecord({"set": name, **(grow or {})})})
    replies = federation.send_to_hospitals("query.audit", content)
    ok = federation.usable(replies, f"audit of {name!r}")
    total = len(images)
    table = index.copy()
    flags_any = np.zeros(total, dtype=bool)
    hospitals, links, forget, requested = {}, {}, {}, {}
    for h, reply in sorted(ok.items()):
        site = hospital_name(h)
        scores = reply.content["results"]["scores"].numpy()
        flags = reply.content["results"]["flags"].numpy().astype(bool)
        matched = list(reply.content["tokens"]["matched"])
        if len(scores) != total or len(flags) != total or len(matched) != total:
            raise RuntimeError(f"{site} returned {len(scores)} scores for {total} synthetic images")
        flags_any |= flags
        links[site] = linked_patients(matched, flags)
        forget[site] = sorted(reply.content["tokens"]["forget"])
        requested[site] = sorted(reply.content["tokens"]["requested"])
        metrics = {k: float(v) for k, v in reply.content["metrics"].items()}
        # Recomputed from the flags and tokens themselves; the hospital's own counts must agree.
        hospitals[site] = {**metrics, **summary(total, flags, links[site])}
        if hospitals[site]["non_anon"] != int(metrics["non_anon"]):
            raise RuntimeError(f"{site} reported {metrics['non_anon']:.0f} non-anonymous images but flagged "
                               f"{hospitals[site]['non_anon']}")
        table[f"{site}-score"], table[f"{site}-flagged"], table[f"{site}-token"] = scores, flags, matched
    table["non_anonymous"] = flags_any
    overall = summary(total, flags_any, pooled_links(links))
    control = control_summary(hospitals)
    overall.update(control_rate_max=control["rate_max"], control=control)
    result = {"set": name, "images": total, "overall": overall, "hospitals": hospitals,
              "threshold": {s: r["threshold"] for s, r in hospitals.items()},
              "calibrated": any(r["threshold-calibrated"] for r in hospitals.values()),
              "linked_tokens": {s: sorted(t) for s, t in links.items()}, "forget_tokens": forget,
              "requested_tokens": requested,
              "missed": sorted(hospital_name(h) for h in [*replies.errors, *replies.missing])}
    write_json_atomic(run.file("audit", f"{name}.json"), result)
    write_text_atomic(run.file("audit", f"{name}.csv"), table.to_csv(index=False))
    _print_audit(name, result)
    return result


def control_summary(hospitals: dict) -> dict:
    """The pooled false-positive control of an audit from its per-hospital rates and image counts."""
    return pooled_control({s: (round(r["control-rate"] * r["control-images"]), int(r["control-images"]))
                           for s, r in hospitals.items()})


def _print_audit(name: str, result: dict) -> None:
    kind = "calibrated per hospital" if result["calibrated"] else "fixed"
    table = Table(title=f"Audit of synthetic set '{name}' ({result['images']} images; threshold {kind})")
    for col in ("site", "Non-Anon", "ODA %", "PIR %", "patients linked", "forget set (patients / images)",
                "threshold", "control FP %", "pixel copies", "entanglement %"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for site, r in result["hospitals"].items():
        forget = (f"{r['forget-patients']:.0f} / {r['forget-images']:.0f}" if "forget-patients" in r else "–")
        ent = f"{r['entanglement-percent']:.1f}" if "entanglement-percent" in r else "–"
        table.add_row(site, str(r["non_anon"]), f"{r['oda']:.1f}", f"{r['pir']:.1f}", str(r["patients_linked"]),
                      forget, f"{r['threshold']:.3f}",
                      f"{round(r['control-rate'] * r['control-images'])}/{r['control-images']:.0f} "
                      f"({100 * r['control-rate']:.1f})", f"{r['pixel-copies']:.0f}", ent)
    o = result["overall"]
    table.add_row("federation", str(o["non_anon"]), f"{o['oda']:.1f}", f"{o['pir']:.1f}", str(o["patients_linked"]),
                  "", "", f"{o['control']['flagged']}/{o['control']['images']} ({100 * o['control']['rate']:.1f}; "
                  f"CI {100 * o['control']['ci_low']:.1f}–{100 * o['control']['ci_high']:.1f})", "", "")
    console.print(table)


def audit(federation: Federation, run: RunDirectory) -> dict:
    """Audit the original model's synthetic set: Non-Anon, ODA, PIR, and each hospital's forget set."""
    result = audit_set(federation, run, "original")
    ledger.record_forget_sets(run, "original", result)
    o = result["overall"]
    return {"non_anon": o["non_anon"], "oda": round(o["oda"], 2), "pir": round(o["pir"], 2),
            "patients_linked": o["patients_linked"], "control_rate_max": round(o["control_rate_max"], 4),
            "control": o["control"]}
