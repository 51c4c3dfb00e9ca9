"""The HTML report: one self-contained file with every panel, from full runs, probe-only runs and damaged files."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.synthetic_run import write_synthetic_run
from trl_ntk.output.files import save_attributions
from trl_ntk.report.render import PANEL_IDS, attribution_data, build_report, find_jsonl, load_run, main

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
FIGURE_PANELS = (
    "panel-logp",
    "panel-squeezing",
    "panel-prediction",
    "panel-split",
    "panel-attribution",
    "panel-lld",
    "panel-nthr",
)


def _sections(page: str) -> dict[str, str]:
    """Panel id -> the HTML of its section."""
    parts = re.split(r'(?=<section class="panel" id=")', page)
    return {re.match(r'<section class="panel" id="([^"]+)"', p).group(1): p for p in parts if p.startswith("<section")}


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("grpo_run")
    write_synthetic_run(run_dir, trainer="grpo", steps=8, every=2)
    return build_report(run_dir, progress=False)


def test_report_is_one_self_contained_file_with_every_panel(full_report):
    page = full_report.read_text(encoding="utf-8")
    assert full_report.name == "report.html"
    assert not re.search(r"<script[^>]*\bsrc\s*=", page), "scripts must be inlined"
    assert not re.search(r"<link[^>]*\bhref\s*=\s*[\"']https?:", page)
    assert "Plotly" in page and len(page) > 3_000_000  # plotly.js is inlined
    sections = _sections(page)
    assert list(sections) == list(PANEL_IDS)
    for panel_id in PANEL_IDS:
        assert "no-data" not in sections[panel_id], panel_id
    assert 'id="attribution-step"' in sections["panel-attribution"] and "attribution-data" in page
    assert "pushed up by" in sections["panel-top-tokens"] and 'class="chip up"' in sections["panel-top-tokens"]


def test_report_of_a_probe_only_run_shows_no_data_notes_instead_of_missing_panels(tmp_path):
    write_synthetic_run(tmp_path, attribution="none", steps=4)
    sections = _sections(build_report(tmp_path, progress=False).read_text(encoding="utf-8"))
    assert list(sections) == list(PANEL_IDS)
    for panel_id in (
        "panel-prediction",
        "panel-split",
        "panel-attribution",
        "panel-top-tokens",
        "panel-lld",
        "panel-nthr",
    ):
        assert 'class="no-data"' in sections[panel_id], panel_id
    for panel_id in ("panel-run", "panel-logp", "panel-squeezing"):
        assert 'class="no-data"' not in sections[panel_id], panel_id
    assert "figure-logp" in sections["panel-logp"]


def test_report_of_a_sums_run_has_predictions_but_no_attribution_maps(tmp_path):
    write_synthetic_run(tmp_path, attribution="sums", steps=4)
    sections = _sections(build_report(tmp_path, progress=False).read_text(encoding="utf-8"))
    assert "figure-prediction" in sections["panel-prediction"] and "figure-split" in sections["panel-split"]
    assert 'class="no-data"' in sections["panel-attribution"]


def test_report_tolerates_a_partial_last_line_and_duplicated_steps(tmp_path):
    path = write_synthetic_run(tmp_path, steps=4, kinds=("chosen", "rejected"), num_prompts=1)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    probe_line = next(line for line in lines if '"type":"probe"' in line)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(probe_line)  # a resumed run that did not truncate
        handle.write('{"schema_version":2,"type":"probe","st')
    data = load_run(tmp_path, progress=False)
    keys = [(r["step"], r["probe_id"]) for r in data.of("probe")]
    assert len(keys) == len(set(keys))
    assert build_report(tmp_path, tmp_path / "out" / "r.html", progress=False).exists()


def test_find_jsonl_accepts_the_run_folder_the_trainer_output_dir_and_the_file(tmp_path):
    path = write_synthetic_run(tmp_path / "dynamics", steps=2)
    assert find_jsonl(tmp_path) == find_jsonl(tmp_path / "dynamics") == find_jsonl(path) == path
    with pytest.raises(FileNotFoundError, match="dynamics.jsonl"):
        find_jsonl(tmp_path / "nowhere")


def test_attribution_data_keeps_the_largest_columns_in_order_and_escapes_token_labels(tmp_path):
    write_synthetic_run(tmp_path, attribution="none", steps=2, kinds=("chosen",), num_prompts=1)
    matrix = np.zeros((2, 300), dtype=np.float32)
    matrix[:, [5, 100, 250]] = [[1.0, -2.0, 0.5], [0.5, -1.0, 0.25]]
    train_tokens = np.array([f"t{i}" for i in range(300)])
    train_tokens[100] = "<b>"
    save_attributions(
        tmp_path,
        0,
        {
            "p0-chosen": matrix,
            "p0-chosen.tokens": ["A", "\n"],
            "train.tokens": train_tokens,
            "train.row": np.zeros(300, dtype=int),
        },
    )
    data = attribution_data(load_run(tmp_path, progress=False), max_cols=3, progress=False)
    block = data["probes"]["p0-chosen"]["by_step"]["0"]
    assert block["x"] == ["t5", "&lt;b&gt;", "t250"] and block["y"] == ["A", "\\n"]
    assert block["z"] == [[1.0, -2.0, 0.5], [0.5, -1.0, 0.25]] and block["shape"] == [2, 300]
    assert data["probes"]["p0-chosen"]["kind"] == "chosen" and data["probes"]["p0-chosen"]["steps"] == [0]


def test_attribution_data_draws_fewer_steps_when_the_blocks_would_be_too_large(tmp_path):
    write_synthetic_run(tmp_path, steps=12, every=2, kinds=("chosen",), num_prompts=1)
    run = load_run(tmp_path, progress=False)
    cells = np.load(run.archives[-1][1])["p0-chosen"].size
    data = attribution_data(run, max_cells=3 * cells, progress=False)
    assert data["probes"]["p0-chosen"]["steps"] == [0, 4, 10]  # evenly spaced, the last analysed step included


def test_main_writes_the_report_where_asked(tmp_path, capsys):
    write_synthetic_run(tmp_path / "run", steps=2)
    assert main([str(tmp_path / "run"), "-o", str(tmp_path / "x.html"), "-q"]) == 0
    assert (tmp_path / "x.html").exists() and capsys.readouterr().out.strip() == str(tmp_path / "x.html")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing"), "-q"])
    assert exit_info.value.code == 2


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=10000",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


@pytest.mark.browser
def test_report_renders_every_figure_in_headless_chromium_without_console_errors(full_report, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed")
    url = full_report.resolve().as_uri()
    dom = _chromium(["--dump-dom", url], tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not console, "\n".join(console)
    sections = _sections(dom.stdout)
    assert list(sections) == list(PANEL_IDS)
    for panel_id in FIGURE_PANELS:
        assert 'class="main-svg"' in sections[panel_id], f"{panel_id} has no rendered plot"
    assert "step 6 (4 of 4)" in sections["panel-attribution"]  # the slider's script ran

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "report_screenshot.png"
    shot = _chromium(["--window-size=1400,3000", f"--screenshot={screenshot}", url], tmp_path / "profile-shot")
    assert shot.returncode == 0 and screenshot.stat().st_size > 50_000, shot.stderr[-2000:]


@pytest.mark.slow
def test_report_of_a_real_tiny_trainer_run_loads_and_renders_every_record_type_it_wrote(tmp_path):
    from tests import trainer_factory
    from trl_ntk.integration.callbacks import LearningDynamicsCallback

    trainer = trainer_factory.dpo_trainer(tmp_path, max_steps=2, report_to="none", n=8)
    trainer.add_callback(
        LearningDynamicsCallback(
            trainer,
            every_n_steps=1,
            attribution="tokens",
            num_prompts=1,
            max_new_tokens=4,
            strict=True,
            matrix_every_n_steps=None,
        )
    )
    trainer.train()
    data = load_run(tmp_path, progress=False)
    assert {"run", "probes", "probe", "dynamics", "status"} <= set(data.records)
    assert sorted({r["step"] for r in data.of("dynamics")}) == [0, 1]
    assert sorted({r["step"] for r in data.of("probe")}) == [0, 1, 2]
    assert len({r["run_id"] for rs in data.records.values() for r in rs}) == 1 and not data.other_runs
    assert all(r["path"] in ("func", "forward_ad", "finite_difference") for r in data.of("dynamics"))
    assert all("cells" in r and "gradient_check" in r for r in data.of("dynamics"))
    assert [step for step, _ in data.archives] == [0, 1]
    sections = _sections(build_report(tmp_path, progress=False).read_text(encoding="utf-8"))
    assert list(sections) == list(PANEL_IDS)
    for panel_id in ("panel-run", "panel-logp", "panel-prediction", "panel-split", "panel-attribution"):
        assert 'class="no-data"' not in sections[panel_id], panel_id
    assert (
        "figure-prediction" in sections["panel-prediction"] and 'id="attribution-step"' in sections["panel-attribution"]
    )


def test_main_refuses_an_unknown_schema_version_and_a_wrong_typed_field_with_one_line(tmp_path, capsys):
    path = write_synthetic_run(tmp_path, steps=2, kinds=("chosen",), num_prompts=1)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1].replace('"schema_version":2', '"schema_version":99'))
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "-q"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1 and "schema_version 99" in error
    assert "Traceback" not in error
    probe_line = next(i for i, line in enumerate(lines) if '"type":"probe"' in line)
    lines[probe_line] = lines[probe_line].replace('"num_tokens":', '"num_tokens":"many","x":')
    path.write_text("".join(lines))
    with pytest.raises(SystemExit):
        main([str(tmp_path), "-q"])
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "field 'num_tokens'" in error and f":{probe_line + 1}:" in error


def test_main_refuses_a_non_positive_heatmap_step_count_before_reading(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing"), "--max-heatmap-steps", "-3"])
    assert exit_info.value.code == 2 and "must be a positive integer, got -3" in capsys.readouterr().err


def test_a_corrupt_archive_costs_only_its_heat_maps_with_one_warning_line(tmp_path, caplog):
    write_synthetic_run(tmp_path, steps=4, every=2, kinds=("chosen",), num_prompts=1)
    archive = tmp_path / "attributions" / "step_2.npz"
    archive.write_bytes(archive.read_bytes()[: len(archive.read_bytes()) // 2])  # a zip cut short
    (tmp_path / "attributions" / "step_0.npz").write_bytes(b"PK\x03\x04 not a zip at all")
    data = attribution_data(load_run(tmp_path, progress=False), progress=False)
    assert data is None  # both archives were damaged; the panel says "no data"
    assert caplog.text.count("cannot read") == 2
    assert main([str(tmp_path), "-q"]) == 0


def test_main_writes_into_a_folder_given_as_output_and_leaves_no_temporary_file(tmp_path, capsys):
    write_synthetic_run(tmp_path / "run", steps=2, kinds=("chosen",), num_prompts=1)
    (tmp_path / "out").mkdir()
    assert main([str(tmp_path / "run"), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert (tmp_path / "out" / "report.html").is_file()
    assert not list(tmp_path.glob("**/*.tmp"))
    capsys.readouterr()
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a folder")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "run"), "-o", str(blocked / "r.html"), "-q"])
    assert exit_info.value.code == 2 and "Traceback" not in capsys.readouterr().err
    assert not list(tmp_path.glob("**/*.tmp"))


def test_report_of_a_file_with_two_runs_shows_the_latest_and_names_the_other(tmp_path, caplog):
    path = write_synthetic_run(tmp_path, steps=4, kinds=("chosen",), num_prompts=1)
    old = path.read_text(encoding="utf-8")
    (tmp_path / "new").mkdir()
    write_synthetic_run(tmp_path / "new", steps=2, kinds=("chosen",), num_prompts=1)
    new = (tmp_path / "new" / "dynamics.jsonl").read_text(encoding="utf-8")
    path.write_text(old + new + old.splitlines(keepends=True)[3], encoding="utf-8")  # as an older version mixed them
    data = load_run(tmp_path, progress=False)
    old_id = next(r["run_id"] for r in map(json.loads, old.splitlines()))
    assert data.other_runs == [old_id] and "other run" in caplog.text
    assert max(r["step"] for r in data.of("probe")) == 2
    sections = _sections(build_report(tmp_path, progress=False).read_text(encoding="utf-8"))
    assert old_id in sections["panel-run"] and "other runs in the file" in sections["panel-run"]


def test_report_shows_the_truth_guard_per_step_next_to_the_predictions(tmp_path):
    """Step 2 of a synthetic run made untrusted (cosine 0.93): the prediction panel draws the guard per step, names
    step 2 with its reason and crosses its points; the run panel counts it; a trusted run says all are trusted."""
    from trl_ntk.report.panels import guard_by_step

    path = write_synthetic_run(tmp_path, attribution="sums", steps=6, every=2)
    reason = "gradient check cosine 0.93 (needs >= 0.999999): dropout active <drop>"
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["type"] == "dynamics":
            bad = record["step"] == 2
            record["gradient_check"]["cosine"] = 0.93 if bad else 1 - 1e-12
            record["trusted"], record["trust_reason"] = (False, reason) if bad else (True, None)
        if record["type"] == "status":
            record["untrusted_steps"] = 1
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    data = load_run(tmp_path, progress=False)
    guard = guard_by_step(data.of("dynamics"))
    assert [(g.step, g.trusted) for g in guard] == [(0, True), (2, False), (4, True)]
    assert guard[1].cosine == 0.93 and guard[1].reason == reason
    sections = _sections(build_report(tmp_path, progress=False).read_text(encoding="utf-8"))
    prediction = sections["panel-prediction"]
    assert "figure-guard" in prediction and "1 - cosine" in prediction
    assert re.search(r'"symbol":\["circle","circle","x","x","circle"', prediction)  # step 2's points are crosses
    assert "1 of 3 analysed steps not trusted</b> (steps 2)" in prediction
    assert "dropout active &lt;drop&gt;" in prediction and "<drop>" not in prediction
    assert "steps not trusted (truth guard)</th><td>1<" in sections["panel-run"]

    trusted_dir = tmp_path / "trusted"
    trusted = write_synthetic_run(trusted_dir, attribution="sums", steps=4)
    records = [json.loads(line) for line in trusted.read_text(encoding="utf-8").splitlines()]
    for record in records:
        if record["type"] == "dynamics":
            record["trusted"] = True
    trusted.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    prediction = _sections(build_report(trusted_dir, progress=False).read_text(encoding="utf-8"))["panel-prediction"]
    assert "2 of 2 analysed steps judged, all trusted" in prediction and "guard-untrusted" not in prediction
