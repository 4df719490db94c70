"""Flower ClientApp: a hospital. Handlers translate messages into fl_unlearn calls on local data."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.hospital import Hospital
from fl_unlearn.data.partition import describe_rows, patients_fingerprint

app = ClientApp()


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
