"""The record schema: one version, a builder per record type, and the one reader (damaged lines skipped and counted,
unknown versions and wrong-typed fields refused, several runs in one file told apart)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from trl_ntk.integration import nthr
from trl_ntk.output import records, schema, sinks
from trl_ntk.output.schema import SchemaError, latest_run, read_jsonl, read_records
from trl_ntk.probes.probe_set import PREFERENCE_KINDS, REFERENCE_KINDS, SAMPLED_KINDS
from trl_ntk.report import load


def _write(path, records_: list[dict]) -> None:
    path.write_bytes(b"".join((schema.encode_record(r) + "\n").encode("utf-8") for r in records_))


def test_the_version_is_defined_once_and_every_writer_uses_it():
    assert sinks.SCHEMA_VERSION is schema.SCHEMA_VERSION
    assert not hasattr(nthr, "SCHEMA_VERSION") and not hasattr(records, "SCHEMA_VERSION")
    stats = SimpleNamespace(
        frac_downweighted=0.5, tau=float("nan"), eta=0.2, s_neg_mean=0.1, num_groups=2, num_mixed_groups=1
    )
    record = nthr.nthr_record(3, stats, 0.01, "generation", None)
    assert record == {**record, "schema_version": schema.SCHEMA_VERSION, "type": "nthr", "step": 3, "tau": None}


def test_every_record_type_has_a_builder_and_the_builders_records_pass_the_readers_check(tmp_path):
    stats = SimpleNamespace(frac_downweighted=0.5, tau=0.3, eta=0.2, s_neg_mean=0.1, num_groups=2, num_mixed_groups=1)
    built = [
        schema.run_record(0, "dpo", {"every_n_steps": 1}, {"torch": "x"}, None),
        schema.probes_record(0, [{"probe_id": "a", "prompt_id": "p", "kind": "chosen"}]),
        schema.probe_record(0, probe_id="a", prompt_id="p", kind="chosen", logp_sum=-1.0, num_tokens=1),
        schema.dynamics_record(0, probe_id="a", prompt_id="p", kind="chosen", observed=-0.5, predicted=-0.25),
        schema.lld_record(0, group=0, delta_observed=-0.1, trusted=False, trust_reason="gradient check failed"),
        schema.nthr_record(1, stats, 0.01, "old_logps", 0.1),
        schema.status_record(1, 0, {"jsonl": 0}, ""),
        schema.lookahead_record(2, view="sgd", num_examples=4, spearman={"chosen": None}, top_k_overlap={}),
    ]
    assert [r["type"] for r in built] == list(schema.RECORD_TYPES)
    assert built[3]["gap"] == -0.25 and built[3]["trusted"] is None and built[3]["trust_reason"] is None
    assert built[4]["trusted"] is False and built[4]["trust_reason"] == "gradient check failed"
    path = tmp_path / "dynamics.jsonl"
    _write(path, built)
    assert [r["type"] for r in read_records(path)] == list(schema.RECORD_TYPES)
    with pytest.raises(ValueError, match="unknown record type"):
        schema.header("probes_typo", 0)


def test_kind_order_of_the_report_is_the_probe_kinds_constant():
    assert load.KIND_ORDER == schema.PROBE_KINDS
    assert set(schema.PROBE_KINDS) == set(PREFERENCE_KINDS) | set(REFERENCE_KINDS) | set(SAMPLED_KINDS)
    assert "shuffled_completion" in load.KIND_ORDER


@pytest.mark.parametrize("cut", ["mid_character", "mid_json"])
def test_reader_skips_and_counts_a_line_cut_anywhere(tmp_path, cut):
    path = tmp_path / "dynamics.jsonl"
    good = [schema.probes_record(0, [{"probe_id": "é", "prompt": "naïve café ☕"}]), schema.status_record(1, 0, {}, "")]
    _write(path, good)
    line = (schema.encode_record(schema.probe_record(2, probe_id="☕", prompt_id="p", kind="chosen")) + "\n").encode()
    index = line.index("☕".encode()) + 1 if cut == "mid_character" else len(line) // 2
    with open(path, "ab") as handle:
        handle.write(line[:index])  # a write cut short, e.g. by a full disk
    if cut == "mid_character":
        with pytest.raises(UnicodeDecodeError):  # what a text-mode reader does with such a file
            path.read_text(encoding="utf-8")
    found = read_jsonl(path)
    assert [r["type"] for r in found.records] == ["probes", "status"] and found.damaged_lines == 1
    assert found.records[0]["probes"][0]["prompt"] == "naïve café ☕"


def test_reader_refuses_an_unknown_schema_version_and_a_wrong_typed_field_naming_the_line(tmp_path):
    path = tmp_path / "dynamics.jsonl"
    record = schema.probe_record(0, probe_id="a", prompt_id="p", kind="chosen", logp_sum=-1.0)
    path.write_text(json.dumps({**record, "schema_version": 99}) + "\n")
    with pytest.raises(SchemaError, match=r"dynamics.jsonl:1: schema_version 99 is not one this trl_ntk reads"):
        read_records(path)
    path.write_text(json.dumps(record) + "\n" + json.dumps({**record, "logp_sum": "high"}) + "\n")
    with pytest.raises(SchemaError, match=r":2: field 'logp_sum' of a 'probe' record is str"):
        read_records(path)
    path.write_text(json.dumps({**record, "step": True}) + "\n")
    with pytest.raises(SchemaError, match="field 'step'"):
        read_records(path)


def test_latest_run_keeps_the_last_fresh_start_and_its_resumes_and_names_the_others():
    def run(run_id, resumed_from):
        return {**schema.run_record(0, "dpo", {}, {}, resumed_from), "run_id": run_id}

    def probe(run_id, step):
        return {**schema.probe_record(step, probe_id="a", prompt_id="p", kind="chosen"), "run_id": run_id}

    mixed = [run("old", None), probe("old", 0), run("new", None), probe("old", 1), probe("new", 0)]
    mixed += [run("resumed", 0), probe("resumed", 1)]
    kept, others = latest_run(mixed)
    assert [(r["type"], r["run_id"], r["step"]) for r in kept] == [
        ("run", "new", 0),
        ("probe", "new", 0),
        ("run", "resumed", 0),
        ("probe", "resumed", 1),
    ]
    assert others == ["old"]
    legacy = [schema.probe_record(0, probe_id="a", prompt_id="p", kind="chosen")]  # no run ids: one run
    assert latest_run(legacy) == (legacy, [])
