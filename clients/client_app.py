"""Flower ClientApp: a hospital. Handlers translate messages into fl_unlearn calls on local data."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import reid, unlearning
from clients.audit import audit_synthetic
from clients.classifier import classifier_round
from clients.faults import inject_faults
from clients.generative import encode_cache, ldm_round, vae_round
from clients.hospital import Hospital
from fl_unlearn.data.partition import describe_rows, patients_fingerprint
from fl_unlearn.training.common import release_memory


def release_gpu_memory(msg: Message, context: Context, call_next) -> Message:
    """A ClientApp mod: after every message, give the GPU memory this hospital's models held back."""
    try:
        return call_next(msg, context)
    finally:
        release_memory()


app = ClientApp(mods=[release_gpu_memory, inject_faults])

#: Local training round of each federated phase: (hospital, global state, config) → (local state, metrics).
TRAINERS = {"train-vae": vae_round, "train-ldm": ldm_round, "train-reid": reid.reid_round,
            "train-classifier": classifier_round}


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    """Report this hospital's data: counts and a fingerprint of its patient set, never ids."""
    hospital = Hospital.from_context(context)
    counts = describe_rows(hospital.rows)
    metrics = MetricRecord(
        {"patients": counts["patients"], "images": counts["images"], "positives": counts["positives"],
         "num-examples": counts["images"]}
    )
    info = ConfigRecord(
        {"hospital": hospital.name, "hospital-index": hospital.index, "source": hospital.cohort.source,
         "fingerprint": patients_fingerprint(sorted(set(hospital.rows["patient"])))}
    )
    return Message(RecordDict({"counts": metrics, "info": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local round of the phase named in the config; replies with weights and example count."""
    hospital = Hospital.from_context(context)
    config = msg.content["config"]
    phase = str(config["phase"])
    state = msg.content["arrays"].to_torch_state_dict()
    if phase.startswith("unlearn-"):
        mask = ({k: v.bool() for k, v in msg.content["mask"].to_torch_state_dict().items()}
                if "mask" in msg.content.array_records else None)
        state, metrics = unlearning.unlearn_round(hospital, state, config, mask)
    elif phase in TRAINERS:
        state, metrics = TRAINERS[phase](hospital, state, config)
    else:
        raise ValueError(f"unknown training phase {phase!r}; known: {sorted(TRAINERS)} and unlearn-<method>")
    return Message(RecordDict({"arrays": ArrayRecord(torch_state_dict=state), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


@app.query("encode")
def encode(msg: Message, context: Context) -> Message:
    """Cache this hospital's LDM latents locally; reply with per-channel moments (aggregates only)."""
    hospital = Hospital.from_context(context)
    count, moments = encode_cache(hospital, msg.content["arrays"].to_torch_state_dict())
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": count}),
                               "moments": ConfigRecord(moments)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Keep the final re-identification networks (global, or trained here when local-only) and measure them."""
    hospital = Hospital.from_context(context)
    config = msg.content["config"]
    if str(config["phase"]) != "train-reid":
        raise ValueError(f"nothing to evaluate in phase {config['phase']!r}")
    state = msg.content["arrays"].to_torch_state_dict() if "arrays" in msg.content.array_records else None
    metrics = reid.keep_and_evaluate(hospital, state)
    return Message(RecordDict({"metrics": MetricRecord({**metrics, "num-examples": metrics["holdout-images"]})}),
                   reply_to=msg)


@app.query("audit")
def audit(msg: Message, context: Context) -> Message:
    """Audit the server's synthetic images against this hospital's patients; reply scores, flags, salted tokens."""
    hospital = Hospital.from_context(context)
    images = msg.content["synthetic"]["images"].numpy()
    config = msg.content["config"]
    grow = {k: str(config[k]) for k in ("forget-set", "grow-from")} if "forget-set" in config else None
    arrays, tokens, metrics = audit_synthetic(hospital, images, str(config["set"]), grow)
    return Message(RecordDict({
        "results": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "tokens": ConfigRecord(tokens),
        "metrics": MetricRecord(metrics),
    }), reply_to=msg)


@app.query("saliency")
def saliency(msg: Message, context: Context) -> Message:
    """SalUn: this hospital's summed clipped forget-loss gradients at θ0 (empty without forget patients)."""
    hospital = Hospital.from_context(context)
    scores = unlearning.saliency(hospital, msg.content["arrays"].to_torch_state_dict(), msg.content["config"])
    content = RecordDict({"metrics": MetricRecord({"has-forget": int(scores is not None)})})
    if scores is not None:
        content["scores"] = ArrayRecord(torch_state_dict=scores)
    return Message(content, reply_to=msg)
