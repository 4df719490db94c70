"""ClientApp and ServerApp without Ray: the real dispatch, driven by an in-process grid."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from flwr.app import Context, Message, RecordDict

from clients.client_app import app as client_app
from clients.hospital import Hospital, hospital_index, site_config
from fl_unlearn.data.sources import load_federation
from fl_unlearn.errors import ConfigError, DataError
from server.server_app import app as server_app
from tests.fake_grid import FakeGrid


def test_describe_reports_counts_and_a_fingerprint_but_no_patient_ids(test_config):
    from fl_unlearn.data.sources import load_federation

    cohort, plan = load_federation(test_config)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 3},
                  state=RecordDict(), run_config=test_config.to_run_config())
    reply = client_app(Message(RecordDict(), 7, "query.describe"), ctx)

    assert not reply.has_error()
    counts, info = reply.content["counts"], reply.content["info"]
    expected = plan.summary(cohort.table)["hospitals"][1]
    assert int(counts["images"]) == expected["images"]
    assert info["fingerprint"] == expected["fingerprint"]
    sent = repr(dict(counts)) + repr(dict(info))
    assert not any(pid in sent for pid in cohort.table["patient"].unique())


def test_unknown_message_type_is_rejected(test_config):
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3},
                  state=RecordDict(), run_config=test_config.to_run_config())
    with pytest.raises(ValueError, match="No query function registered"):
        client_app(Message(RecordDict(), 7, "query.nonsense"), ctx)


def test_hospital_index_from_simulation_or_deployment_node_config():
    assert hospital_index({"partition-id": 2, "num-partitions": 3}, 3) == 2
    assert hospital_index({"hospital-id": 0}, 3) == 0
    with pytest.raises(ConfigError, match="num-supernodes=3"):
        hospital_index({"partition-id": 0, "num-partitions": 2}, 3)
    with pytest.raises(ConfigError, match="neither 'hospital-id' nor 'partition-id'"):
        hospital_index({}, 3)


def test_a_deployed_supernode_keeps_its_own_data_folder_and_work_folder(test_config, tmp_path):
    """``--node-config "hospital-id=1 work-dir=... cache-dir=..."``: the site's folders win, nothing under the run."""
    node_config = {"hospital-id": 1, "work-dir": str(tmp_path / "site"), "cache-dir": str(tmp_path / "cache")}
    ctx = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                  run_config=test_config.to_run_config())
    hospital = Hospital.from_context(ctx)
    assert hospital.index == 1 and hospital.config.cache_path == tmp_path / "cache"
    assert hospital.work_dir == tmp_path / "site" / test_config.run_name
    assert not (test_config.run_dir / "hospitals").exists()
    assert site_config(test_config, {"hospital-id": 0, "data-root": "/site/mimic"}).data_root == "/site/mimic"
    with pytest.raises(ConfigError, match=r"unknown node-config key\(s\) \['data-path'\]"):
        site_config(test_config, {"hospital-id": 0, "data-path": "/x"})


def _leaks(msg: Message, size: int, patient_ids: set[str], run_dir: str, real_images: set[bytes] = frozenset(),
           *, from_hospital: bool = True) -> list[str]:
    """What in a message would break the privacy rules: a real image (any array slice equal to one), raw ids,
    paths; and in a hospital's reply, any image-shaped array at all (the server's messages carry synthetic
    images, which are image-shaped by design)."""
    found = []
    content = msg.content
    for name, record in content.array_records.items():
        for key, array in record.items():
            if len(array.shape) >= 2 and tuple(array.shape[-2:]) == (size, size):
                if from_hospital:
                    found.append(f"{name}.{key}: image-shaped array {array.shape}")
                pixels = array.numpy()
                if pixels.dtype == np.uint8 and any(
                        image.tobytes() in real_images for image in pixels.reshape(-1, size, size)):
                    found.append(f"{name}.{key}: a real image")
    strings = []
    for name, record in content.config_records.items():
        for key, value in record.items():
            strings.append(key)
            strings.extend(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str))
    for record in content.metric_records.values():
        strings.extend(record.keys())
    for text in strings:
        if text in patient_ids or any(p in text for p in patient_ids):
            found.append(f"raw patient id in {text!r}")
        if run_dir in text or text.startswith("/"):
            found.append(f"file path {text!r}")
    return found


def test_server_runs_every_phase_and_no_hospital_message_leaks_images_or_ids(test_config, monkeypatch, tmp_path):
    cohort, plan = load_federation(test_config)
    requester = str(min(plan.hospital_rows(cohort.table, 1)["patient"]))
    (tmp_path / "requests.csv").write_text(f"hospital,patient\nhospital-1,{requester}\n")
    test_config = test_config.replace(deletion_requests=str(tmp_path / "requests.csv"))
    run_config = test_config.to_run_config()
    patient_ids = set(cohort.table["patient"].astype(str))
    real_images = {image.tobytes() for image in cohort.load_images(cohort.table)}
    messages: list[tuple[str, Message]] = []
    grid = FakeGrid(client_app, run_config, num_nodes=3, intercept=lambda direction, msg: messages.append((direction, msg)))
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))

    # privacy: every message of every phase, both ways, checked
    replies = [m for d, m in messages if d == "client->server"]
    types = {m.metadata.message_type for m in replies}
    assert {"train", "evaluate", "query.audit", "query.saliency"} <= types
    leaks = [leak for direction, m in messages for leak in _leaks(
        m, test_config.image_size, patient_ids, str(test_config.run_dir), real_images,
        from_hospital=direction == "client->server")]
    assert not leaks, leaks
    assert len(messages) == 2 * len(grid.sent)  # every message and every reply scanned
    print(f"privacy scan: {len(messages)} messages ({len(grid.sent)} sent, {len(replies)} replies), 0 findings")
    audit_replies = [m for m in replies if m.metadata.message_type == "query.audit"]
    assert all(len(m.content["results"]["scores"].numpy()) == test_config.num_synthetic for m in audit_replies)

    manifest = json.loads((test_config.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert all(p["status"] == "completed" for p in manifest["phases"].values())
    assert [h["hospital"] for h in manifest["hospitals"]] == ["hospital-0", "hospital-1", "hospital-2"]
    assert manifest["partition"]["disjoint"] is True
    assert manifest["partition"]["test"]["patients"] > 0
    assert {"torch", "flwr", "diffusers"} <= set(manifest["versions"])
    assert manifest["run_config"]["num-hospitals"] == 3
    assert grid.sent[0].metadata.message_type == "query.describe"
    assert {m.metadata.message_type for m in grid.sent} == {"query.describe", "train", "query.encode", "evaluate",
                                                             "query.audit", "query.saliency"}
    results = json.loads((test_config.run_dir / "report" / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["original", *test_config.methods, "real"]
    columns = {"non_anon", "ua", "ua_image", "oda", "pir", "newly_exposed", "auc", "auc_ci_low", "auc_ci_high", "fid",
               "control_fp", "seconds", "hospital_steps"}
    assert all(columns <= set(r) for r in results["rows"][:-1])
    assert results["fid"]["name"] == "FID (domain features)"  # no Inception weights here: named, not hidden
    assert set(results["hospitals"]["original"]) == {"hospital-0", "hospital-1", "hospital-2"}
    assert results["catalog"]["cases"] + results["catalog"]["removed"] == test_config.num_synthetic
    for name in ("report.md", "report/privacy_utility.png", "report/before_after.png", "report/results.csv",
                 "catalog/viewer.html", "catalog/index.csv"):
        assert (test_config.run_dir / name).is_file(), name
    for method in test_config.methods:  # regenerated on the same seeds and labels, then audited again
        index = (test_config.run_dir / "synthetic" / method / "index.csv").read_text()
        assert index == (test_config.run_dir / "synthetic" / "original" / "index.csv").read_text()
        assert (test_config.run_dir / "audit" / f"{method}.json").is_file()
    audit = json.loads((test_config.run_dir / "audit" / "original.json").read_text())
    assert audit["images"] == test_config.num_synthetic
    assert manifest["phases"]["audit"]["non_anon"] == audit["overall"]["non_anon"]
    assert set(manifest["reid"]["hospitals"]) == {"hospital-0", "hospital-1", "hospital-2"}
    # what each hospital keeps to itself
    work = test_config.run_dir / "hospitals" / "hospital-0"
    assert {"forget.csv", "remain.csv", "token-secret.bin", "reid.safetensors"} <= {p.name for p in work.iterdir()}

    # the closed loop (the test preset runs 2 cycles): cycle 1's set is audited, each hospital adds the
    # patients it links there to the forget set, and cycle 2 unlearns the grown set
    assert test_config.unlearn_cycles == 2
    looped = [m for m in test_config.methods if m != "retrain"]
    assert set(results["cycles"]) == set(looped)
    for method in looped:
        grew = False
        for site in ("hospital-0", "hospital-1", "hospital-2"):
            work = test_config.run_dir / "hospitals" / site
            original = json.loads((work / "forget-patients.json").read_text())
            grown = json.loads((work / f"forget-patients-{method}.json").read_text())
            local = pd.read_csv(work / "audit" / f"{method}-cycle1.csv")
            assert set(grown["linked"]) == set(original["linked"]) | set(local.loc[local["flagged"], "patient"].astype(str))
            grew |= set(grown["linked"]) != set(original["linked"])
        # a second cycle runs only if the first exposed somebody new (else it would unlearn the same set again)
        expected = [(1, f"{method}-cycle1"), (2, method)] if grew else [(1, method)]
        cycles = manifest["phases"][f"unlearn-{method}"]["cycles"]
        assert [(c["cycle"], c["set"]) for c in cycles] == expected
        assert all(np.isfinite(e["auc"]) for e in results["cycles"][method])
        sent = [m.content["config"] for m in grid.sent if m.metadata.message_type == "train"
                and m.content["config"]["phase"] == f"unlearn-{method}"]
        assert [(c["cycle"], c["forget-set"]) for c in sent][::3] == [(1, "original"), (2, method)][:len(expected)]

    # the deletion ledger: the request and every finding opened, each reached a final state, chain intact
    from fl_unlearn.ledger import Ledger, verify

    report = verify(test_config.run_dir)
    assert report["chain_ok"] and report["pending"] == [] and report["subjects"] >= 1
    entries = Ledger(test_config.run_dir / "ledger.jsonl").entries()
    requests = [e for e in entries if e["event"] == "request"]
    assert [(e["hospital"], e["token"] == requester) for e in requests] == [("hospital-1", False)]  # salted
    outcomes = {(e["method"], e["cycle"]) for e in entries if e["event"] in ("verified", "still-identified")
                and e["token"] == requests[0]["token"]}
    ran = {m: len(manifest["phases"][f"unlearn-{m}"].get("cycles", [1])) for m in test_config.methods}
    assert outcomes == {(m, c) for m, n in ran.items() for c in range(1, n + 1)}

    # growing is a union with what each later audit links: here an audit that links the i-th LDM patient
    from clients import audit as hospital_audit
    from clients.hospital import Hospital
    from fl_unlearn.privacy.audit import AuditResult

    hospital = Hospital(0, test_config, cohort, plan.hospital_rows(cohort.table, 0))
    ldm_patients = hospital.split.ldm["patient"].astype(str).to_numpy()

    def linking(row: int):
        def fake_audit(retrieval, verification, synthetic, reference, *, threshold, **_):
            n = len(synthetic)
            return AuditResult(scores=np.full(n, 0.9, np.float32), flags=np.arange(n) == 0,
                               neighbours=np.full((n, 1), row), distances=np.zeros((n, 1), np.float32),
                               threshold=threshold)
        return fake_audit

    synthetic = np.zeros((2, test_config.image_size, test_config.image_size), np.uint8)
    base = set(json.loads((hospital.work_dir / "forget-patients.json").read_text())["linked"])
    monkeypatch.setattr(hospital_audit, "audit", linking(0))
    _, tokens, _ = hospital_audit.audit_synthetic(hospital, synthetic, "probe-cycle1",
                                                     {"forget-set": "probe", "grow-from": "original"})
    monkeypatch.setattr(hospital_audit, "audit", linking(len(ldm_patients) - 1))
    hospital_audit.audit_synthetic(hospital, synthetic, "probe-cycle2", {"forget-set": "probe", "grow-from": "probe"})
    grown = json.loads((hospital.work_dir / "forget-patients-probe.json").read_text())["linked"]
    assert set(grown) == base | {ldm_patients[0], ldm_patients[-1]}
    forget = tokens["forget"]
    assert len(forget) == len(base | {ldm_patients[0]}) and not set(forget) & set(ldm_patients)  # salted, not ids


def test_a_failing_hospital_fails_the_setup_phase_and_the_manifest_says_so(test_config, monkeypatch):
    run_config = test_config.to_run_config()
    grid = FakeGrid(client_app, run_config, num_nodes=3)
    grid.contexts[grid.node_ids[2]].node_config["partition-id"] = 7  # a misconfigured SuperNode
    with pytest.raises(RuntimeError, match="hospitals failed to describe their data"):
        server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    manifest = json.loads((test_config.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert "hospitals failed" in manifest["phases"]["setup"]["error"]


def test_the_leak_check_catches_pixels_ids_and_paths():
    from flwr.app import Array, ArrayRecord, ConfigRecord

    real = np.full((32, 32), 7, np.uint8)
    bad = Message(RecordDict({"a": ArrayRecord({"x": Array(np.stack([np.zeros((32, 32), np.uint8), real]))}),
                              "c": ConfigRecord({"who": "P00003", "where": "/data/x.png"})}),
                  dst_node_id=1, message_type="query.audit")

    assert len(_leaks(bad, 32, {"P00003"}, "/runs/x", {real.tobytes()})) == 4  # shape, real image, id, path
    # the server's messages may carry synthetic images, never a real one
    assert _leaks(bad, 32, {"P00003"}, "/runs/x", {real.tobytes()}, from_hospital=False) == \
        ["a.x: a real image", "raw patient id in 'P00003'", "file path '/data/x.png'"]
    synthetic_only = Message(RecordDict({"a": ArrayRecord({"x": Array(np.zeros((2, 32, 32), np.uint8))})}),
                             dst_node_id=1, message_type="query.audit")
    assert _leaks(synthetic_only, 32, set(), "/runs/x", {real.tobytes()}, from_hospital=False) == []


def test_deletion_requests_join_the_forget_set_and_an_unknown_patient_is_named(test_config, tmp_path):
    cohort, plan = load_federation(test_config)
    held = min(plan.hospital_rows(cohort.table, 1)["patient"])
    requests = tmp_path / "requests.csv"
    requests.write_text(f"hospital,patient\nhospital-1,{held}\n")
    config = test_config.replace(deletion_requests=str(requests), unlearn_methods="")
    run_config = config.to_run_config()
    server_app(FakeGrid(client_app, run_config, num_nodes=3),
               Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    chosen = json.loads((config.run_dir / "hospitals" / "hospital-1" / "forget-patients.json").read_text())
    assert chosen["requested"] == [held]

    requests.write_text("hospital,patient\nhospital-2,P99999\n")
    bad = test_config.replace(deletion_requests=str(requests), unlearn_methods="", output_dir=str(tmp_path / "bad"))
    run_config = bad.to_run_config()
    with pytest.raises(DataError, match="hospital-2: .*P99999"):  # found by the preflight, before any training
        server_app(FakeGrid(client_app, run_config, num_nodes=3),
                   Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    assert not bad.run_dir.exists()  # nothing written

    # and a hospital that checks its own requests at audit time names the patient too
    from clients.audit import audit_synthetic
    from clients.hospital import Hospital

    hospital = Hospital(2, bad, cohort, plan.hospital_rows(cohort.table, 2))
    with pytest.raises(DataError, match="P99999"):
        audit_synthetic(hospital, np.zeros((1, bad.image_size, bad.image_size), np.uint8), "original")
    assert not (hospital.work_dir / "forget.csv").exists() and not (hospital.work_dir / "audit").exists()


def _run(config, grid=None):
    run_config = config.to_run_config()
    grid = grid or FakeGrid(client_app, run_config, num_nodes=config.num_hospitals)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return grid


def test_a_hospital_that_misses_the_audit_is_left_out_then_audited_again(test_config, tmp_path, monkeypatch):
    """Hospital 2 hangs in the audit: after reply-timeout-s the run goes on without it, the report names
    it, and the next unlearning phase audits it again, so its deletion request is opened, applied and
    verified. (A hospital that raises instead: the unlearning-rounds test below.)"""
    import threading
    from types import SimpleNamespace

    import clients.faults
    from fl_unlearn.ledger import Ledger, verify

    released = threading.Event()

    def hang(seconds: float) -> None:  # a hospital that never answers, until the test is over
        released.wait(seconds)
        raise RuntimeError("the hung hospital was released after the test")

    monkeypatch.setattr(clients.faults, "time", SimpleNamespace(sleep=hang))
    cohort, plan = load_federation(test_config)
    requester = str(min(plan.hospital_rows(cohort.table, 2)["patient"]))
    (tmp_path / "requests.csv").write_text(f"hospital,patient\nhospital-2,{requester}\n")
    config = test_config.replace(fail_hospital=2, fail_phase="audit", fail_mode="hang", reply_timeout_s=10.0,
                                 unlearn_methods="kl-away,ga", unlearn_cycles=1,
                                 deletion_requests=str(tmp_path / "requests.csv"))
    try:
        _run(config)
    finally:
        released.set()

    manifest = json.loads((config.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert [(m["hospital"], m["phase"], m["step"]) for m in manifest["missed"]] == \
        [("hospital-2", "audit", "audit of 'original'")]
    assert manifest["missed"][0]["error"] == "no reply within 10 s"
    audit = json.loads((config.run_dir / "audit" / "original.json").read_text())
    assert set(audit["hospitals"]) == {"hospital-0", "hospital-1", "hospital-2"}  # audited again, complete now
    entries = Ledger(config.run_dir / "ledger.jsonl").entries()
    opened = [e for e in entries if e["event"] == "request"]
    assert [(e["hospital"], e["retry"]) for e in opened] == [("hospital-2", "kl-away")]
    assert verify(config.run_dir)["pending"] == []
    assert "## Hospitals that missed a step" in (config.run_dir / "report.md").read_text()


def test_a_hospital_that_fails_unlearning_rounds_is_left_out_of_fedavg(test_config, tmp_path):
    cohort, plan = load_federation(test_config)
    requester = str(min(plan.hospital_rows(cohort.table, 1)["patient"]))
    (tmp_path / "requests.csv").write_text(f"hospital,patient\nhospital-1,{requester}\n")
    config = test_config.replace(fail_hospital=1, fail_phase="unlearn-ga", unlearn_methods="ga,kl-away",
                                 unlearn_cycles=1, deletion_requests=str(tmp_path / "requests.csv"))
    _run(config)

    manifest = json.loads((config.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    history = manifest["phases"]["unlearn-ga"]["history"]
    assert all(set(r["hospitals"]) == {"hospital-0", "hospital-2"} and r["missed"] == ["hospital-1"] for r in history)
    steps = {m["step"] for m in manifest["missed"] if m["phase"] == "unlearn-ga"}
    assert steps == {"round 1", "audit of 'ga'"}
    # its subjects were neither unlearned nor re-audited in ga; the kl-away phase then gave them an outcome
    from fl_unlearn.ledger import Ledger, verify

    ga = [e for e in Ledger(config.run_dir / "ledger.jsonl").entries()
          if e.get("method") == "ga" and e["hospital"] == "hospital-1"]
    assert {e["step"] for e in ga} == {"unlearning rounds", "audit of ga"} and all(e["event"] == "missed" for e in ga)
    assert verify(config.run_dir)["pending"] == []


def test_actor_died_errors_are_retried_once(test_config):
    """After a simulated crash, a healthy hospital's message can fail with ActorDiedError: sent again, it works."""
    from flwr.app import Error

    from server.federation import Federation

    class FlakyGrid(FakeGrid):
        failed = False

        def push_messages(self, messages):
            messages = list(messages)
            ids = super().push_messages(messages)
            if not FlakyGrid.failed:
                FlakyGrid.failed = True
                self._replies[ids[0]] = Message(Error(code=0, reason="ray.exceptions.ActorDiedError: the actor died"),
                                                reply_to=messages[0])
            return ids

    grid = FlakyGrid(client_app, test_config.to_run_config(), num_nodes=3)
    federation = Federation(grid, test_config)
    replies = federation.send("query.describe", RecordDict())
    assert len(replies["ok"]) == 3 and not replies["errors"] and len(grid.sent) == 4
