"""FedAvg rounds for any model: send the global weights, hospitals train locally, Flower's FedAvg averages.

One loop serves every federated training phase (autoencoder, diffusion model, later re-identification
and unlearning). After each round the global model is checkpointed and the round recorded in the
manifest, so an interrupted phase resumes from its last completed round with the same result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fl_unlearn.checkpoint import load_checkpoint, save_checkpoint
from fl_unlearn.runs import RunDirectory
from server.federation import Federation


def fedavg_rounds(federation: Federation, run: RunDirectory, *, phase: str, rounds: int,
                  initial: dict[str, torch.Tensor], checkpoint: Path, config: dict,
                  ema_decay: float = 0.0, meta: dict | None = None,
                  before_round: Callable[[int, dict], tuple[dict, dict[str, ArrayRecord]] | None] | None = None) -> dict:
    """Run ``rounds`` FedAvg rounds of message ``train`` with ``config['phase'] = phase``.

    ``before_round(round, global_state)`` returns more config entries and records (e.g. a saliency
    mask) for that round's message, or None to end the rounds there; it also runs for the first
    round after a resume. Returns the final global state (``"global"``), the server-side EMA when
    ``ema_decay`` > 0 (``"ema"``), and per-round hospital metrics (``"history"``).
    """
    start_round, state, ema = 1, initial, None
    done = run.manifest["phases"].get(phase, {}).get("round", 0)
    if done and checkpoint.is_file():  # resume: continue after the last completed round
        state, meta = load_checkpoint(checkpoint)
        if ema_decay > 0 and checkpoint.with_name(checkpoint.stem + "-ema.safetensors").is_file():
            ema, _ = load_checkpoint(checkpoint.with_name(checkpoint.stem + "-ema.safetensors"))
        start_round = int(meta["round"]) + 1
        print(f"[fl-unlearn] {phase}: resuming after round {meta['round']}", flush=True)
    strategy = FedAvg(min_available_nodes=1, min_train_nodes=1)
    history = list(run.manifest["phases"].get(phase, {}).get("history", []))
    for rnd in range(start_round, rounds + 1):
        hook = before_round(rnd, state) if before_round else ({}, {})
        if hook is None:  # the caller ends the rounds early
            break
        more_config, extra = hook
        t0 = time.perf_counter()
        content = RecordDict({"arrays": ArrayRecord(torch_state_dict=state),
                              "config": ConfigRecord({"phase": phase, "round": rnd, **config, **more_config}),
                              **extra})
        replies = federation.send_to_hospitals("train", content, group_id=f"{phase}-{rnd}")
        ok = federation.usable(replies, f"round {rnd}")  # FedAvg over the hospitals that answered
        arrays, _ = strategy.aggregate_train(rnd, list(ok.values()))
        state = arrays.to_torch_state_dict()
        if ema_decay > 0:
            ema = state if ema is None else {k: ema_decay * ema[k] + (1 - ema_decay) * v for k, v in state.items()}
        per_hospital = {f"hospital-{h}": {k: float(v) for k, v in m.content["metrics"].items()}
                        for h, m in sorted(ok.items())}
        record = {"round": rnd, "seconds": round(time.perf_counter() - t0, 2), "hospitals": per_hospital,
                  "missed": sorted(f"hospital-{h}" for h in [*replies.errors, *replies.missing])}
        history.append(record)
        save_checkpoint(checkpoint, state, {"phase": phase, "round": rnd, **(meta or {})})
        if ema is not None:
            save_checkpoint(checkpoint.with_name(checkpoint.stem + "-ema.safetensors"), ema,
                            {"phase": phase, "round": rnd, "ema_decay": ema_decay})
        run.manifest["phases"][phase].update(round=rnd, history=history)
        run.save()
        losses = ", ".join(f"{h} {m['loss']:.4f} ({m['seconds']:.1f} s)" for h, m in per_hospital.items())
        print(f"[fl-unlearn] {phase} round {rnd}/{rounds}: {losses}; round {record['seconds']:.1f} s", flush=True)
    return {"global": state, "ema": ema, "history": history}
