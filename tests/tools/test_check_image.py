"""tools/check_image.py: the catalog of bad samples, files out, the summary table, exit status, workers."""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest

import qwenvl.data as registry
from qwenvl.data.data_qwen import sample_indices
from qwenvl.data.validation import SampleValidator
from qwenvl.data.vision import VisionConfig
from tests.conftest import PYTHON, REPO_ROOT, python_env
from tests.data.bad_catalog import CASES, MODEL_MAX_LENGTH, good_record, make_media

TOOL = str(REPO_ROOT / "tools" / "check_image.py")
TOKEN_KINDS = ("over_length", "no_labels")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> dict:
    """One JSON file: good sample, bad case, good sample, ... for every record case; one JSONL for the line cases."""
    media = make_media(tmp_path_factory.mktemp("check_media"))
    records, expected = [], {}
    for case in CASES:
        if case.jsonl:
            continue
        records.append(good_record(len(records)))
        expected[len(records)] = case
        records.append(case.record)
    records.append(good_record(len(records)))
    annotation = media / "catalog.json"
    annotation.write_text(json.dumps(records))
    lines = [json.dumps(good_record(0)).encode()] + [c.line for c in CASES if c.jsonl] + [json.dumps(good_record(9))
                                                                                         .encode()]
    jsonl = media / "lines.jsonl"
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    return {"media": media, "json": annotation, "records": records, "expected": expected, "jsonl": jsonl,
            "jsonl_expected": {i + 1: c for i, c in enumerate(c for c in CASES if c.jsonl)}}


def run_tool(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, TOOL, *args], cwd=REPO_ROOT, env=python_env(), capture_output=True, text=True,
                          timeout=timeout)


def table_rows(stdout: str) -> dict[str, dict[str, str]]:
    """The summary table as {input: {column: cell}}."""
    lines = stdout.splitlines()
    header = lines[0].split()
    rows = {}
    for line in lines[1:]:
        if not line.strip():
            break
        cells = line.split()
        if len(cells) == len(header):
            rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


def check_problems(found: list[dict], expected: dict, annotation: Path, media: Path, skip_kinds=()) -> None:
    wanted = {index: case for index, case in expected.items() if case.kind not in skip_kinds}
    assert [p["index"] for p in found] == sorted(wanted)
    for problem in found:
        case = wanted[problem["index"]]
        assert problem["kind"] == case.kind, case.name
        assert problem["annotation_path"] == str(annotation)
        prefix = f"{annotation}:{problem['index']}: "
        # JSONL cases name their line; the catalog wrote each as line 2 of its own file
        reason = case.reason.replace("line 2:", f"line {problem['index'] + 1}:") if case.jsonl else case.reason
        if case.regex:
            assert re.fullmatch(re.escape(prefix) + reason.format(D=re.escape(str(media))), problem["message"],
                                flags=re.DOTALL), problem["message"]
        else:
            assert problem["message"] == prefix + reason.format(D=media), case.name
        assert problem["message"] == prefix + problem["reason"]


def test_catalog_without_model_in_two_workers(catalog, tmp_path):
    media, annotation = catalog["media"], catalog["json"]
    result = run_tool(str(annotation), str(catalog["jsonl"]), "--data_path", str(media), "--workers", "2",
                      "--output_dir", str(tmp_path))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "checking" in result.stderr and "sample/s" in result.stderr  # the progress bar

    expected = catalog["expected"]
    found = json.loads((tmp_path / "catalog_problems.json").read_text())
    check_problems(found, expected, annotation, media, skip_kinds=TOKEN_KINDS)
    valid = json.loads((tmp_path / "catalog_valid.json").read_text())
    bad = {i for i, case in expected.items() if case.kind not in TOKEN_KINDS}
    assert valid == [r for i, r in enumerate(catalog["records"]) if i not in bad]
    check_problems(json.loads((tmp_path / "lines_problems.json").read_text()), catalog["jsonl_expected"],
                   catalog["jsonl"], media)
    assert json.loads((tmp_path / "lines_valid.json").read_text()) == [good_record(0), good_record(9)]

    rows = table_rows(result.stdout)
    kinds = Counter(case.kind for case in expected.values() if case.kind not in TOKEN_KINDS)
    total = len(catalog["records"])
    row = rows[str(annotation)]
    assert (row["total"], row["valid"], row["problems"]) == (str(total), str(total - sum(kinds.values())),
                                                            str(sum(kinds.values())))
    assert {k: int(v) for k, v in row.items() if k in kinds} == kinds
    assert all(row[k] == "0" for k in row if k not in kinds and k not in ("total", "valid", "problems"))
    line_kinds = Counter(c.kind for c in catalog["jsonl_expected"].values())
    assert rows["total"]["problems"] == str(sum(kinds.values()) + sum(line_kinds.values()))
    assert "(no --model_name_or_path: over_length and no_labels were not checked)" in result.stdout
    first = min(i for i in bad)
    assert f"  [{expected[first].kind}] {annotation}:{first}: " in result.stdout


def test_catalog_with_model_finds_the_token_problems_too(catalog, tiny_model_dir, tmp_path):
    from tools.check_image import main

    media, annotation = catalog["media"], catalog["json"]
    status = main([str(annotation), "--data_path", str(media), "--model_name_or_path", str(tiny_model_dir),
                   "--model_max_length", str(MODEL_MAX_LENGTH), "--max_pixels", "64*28*28", "--min_pixels",
                   "16*28*28", "--output_dir", str(tmp_path), "--no_progress"])
    assert status == 1
    found = json.loads((tmp_path / "catalog_problems.json").read_text())
    check_problems(found, catalog["expected"], annotation, media)
    assert {p["kind"] for p in found} >= set(TOKEN_KINDS)


def test_clean_registry_dataset_exits_zero(tmp_path):
    result = run_tool("demo_single_image", "demo_text_only%50", "--output_dir", str(tmp_path), "--no_progress",
                      "--seed", "3")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stderr == "" or "checking" not in result.stderr
    rows = table_rows(result.stdout)
    assert rows["demo_single_image"] == {"total": "12", "valid": "12", "problems": "0"}
    assert rows["demo_text_only%50"] == {"total": "4", "valid": "4", "problems": "0"}
    demo = json.loads((REPO_ROOT / "demo" / "single_image.json").read_text())
    assert json.loads((tmp_path / "single_image_valid.json").read_text()) == demo
    assert json.loads((tmp_path / "single_image_problems.json").read_text()) == []
    lines = (REPO_ROOT / "demo" / "text_only.jsonl").read_text().splitlines()
    kept = [json.loads(lines[i]) for i in sample_indices(8, 0.5, 3, "demo_text_only")]
    assert json.loads((tmp_path / "text_only_50pct_valid.json").read_text()) == kept


def test_unreadable_file_is_reported_and_fails(tmp_path, capsys):
    from tools.check_image import main

    broken = tmp_path / "broken.json"
    broken.write_text('[{"conversations": []}\n')
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]))
    assert main([str(broken), str(good), "--no_progress"]) == 1
    out = capsys.readouterr().out
    assert table_rows(out)[str(broken)] == {"total": "error", "valid": "-", "problems": "-"}
    assert table_rows(out)[str(good)] == {"total": "1", "valid": "1", "problems": "0"}
    assert f"{broken}: cannot read the annotation file: {broken}:2: invalid JSON: Expecting ',' delimiter " \
           "(column 1)" in out


def test_unknown_name_is_a_usage_error(capsys):
    from tools.check_image import main

    with pytest.raises(SystemExit) as info:
        main(["no_such_dataset"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    # resolved as training resolves --dataset_use (qwenvl/data/sources.py), with its message
    assert "unknown dataset 'no_such_dataset'" in err
    assert f"registered datasets: {', '.join(sorted(registry.data_dict))}; nor is it an existing file or folder" in err


# ------------------------------------------------------------------ issue 9
class FailsOnSample3(SampleValidator):
    """A check that raises what no check expects, on sample 3 only (module level: workers unpickle it)."""

    def check(self, record, ref):
        if ref.index == 3:
            raise TypeError("argument 'text': 'str' object cannot be converted to 'PyString'")
        super().check(record, ref)


@pytest.mark.parametrize("workers", [1, 2])
def test_unexpected_error_is_the_samples_problem_and_checking_goes_on(workers, tmp_path):
    from tools.check_image import check_source, resolve_inputs

    make_media(tmp_path)
    annotation = tmp_path / "many.json"
    annotation.write_text(json.dumps([good_record(k) for k in range(70)]))  # > 2 chunks: really in 2 processes
    (source,) = resolve_inputs([str(annotation)], str(tmp_path), seed=0)
    result = check_source(source, FailsOnSample3(VisionConfig(min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28)),
                          workers, str(tmp_path / "out"), progress=False)
    assert [p.to_dict() for p in result.problems] == [{
        "dataset": str(annotation), "annotation_path": str(annotation), "index": 3, "kind": "unexpected_error",
        "reason": "unexpected error: TypeError: argument 'text': 'str' object cannot be converted to 'PyString'",
        "message": f"{annotation}:3: unexpected error: TypeError: argument 'text': 'str' object cannot be converted "
                   "to 'PyString'"}]
    valid = json.loads((tmp_path / "out" / "many_valid.json").read_text())
    assert valid == [good_record(k) for k in range(70) if k != 3]


def test_error_policy_stops_naming_file_index_and_cause(catalog, tmp_path, capsys):
    from tools.check_image import main

    media, annotation = catalog["media"], catalog["json"]
    assert main([str(annotation), str(catalog["jsonl"]), "--data_path", str(media), "--bad_sample_policy", "error",
                 "--output_dir", str(tmp_path), "--no_progress"]) == 1
    err = capsys.readouterr().err
    first = min(catalog["expected"])
    case = catalog["expected"][first]
    assert err.startswith(f"error: [{case.kind}] {annotation}:{first}: {case.reason.format(D=media)} "
                          "(--bad_sample_policy error: stopped at the first input with a problem; ")
    assert not (tmp_path / "lines_problems.json").exists()  # the second input was not checked


@pytest.mark.parametrize("inputs", [["demo_video", "demo_video"], ["demo_video%50", "demo_video%50"],
                                    ["demo_video", "demo_video%50"]])
def test_input_named_twice_is_a_usage_error(inputs, capsys):
    from tools.check_image import main

    with pytest.raises(SystemExit) as info:
        main(inputs)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "dataset 'demo_video' is named twice in " in err and f"({inputs[0]!r} and {inputs[1]!r})" in err
    assert "name it once (use demo_video%N to keep N percent)" in err


def test_issue9_classes_are_reported_with_their_real_cause(catalog, tmp_path):
    """The surrogate, system-tag, video, symlink and checksum cases: each listed with its cause, none aborts."""
    media, annotation = catalog["media"], catalog["json"]
    result = run_tool(str(annotation), str(catalog["jsonl"]), "--data_path", str(media), "--output_dir",
                      str(tmp_path), "--no_progress")
    assert result.returncode == 1, result.stderr[-3000:]
    found = {p["index"]: p for p in json.loads((tmp_path / "catalog_problems.json").read_text())}
    names = {"avi_header_promises_more_frames", "mp4_header_promises_more_frames", "fps_90000", "zero_time_scale",
             "duration_disagrees_with_frames_and_fps", "jpeg_named_mp4", "png_named_mp4", "image_tag_in_system",
             "video_tag_in_system", "surrogate_in_question", "low_surrogate_in_answer", "surrogate_in_metadata",
             "image_symlink_loop", "video_symlink_loop", "dangling_symlink", "png_checksum_error"}
    indices = {case.name: index for index, case in catalog["expected"].items()}
    assert names <= set(indices)
    for name in names:
        case = catalog["expected"][indices[name]]
        problem = found[indices[name]]
        assert (problem["kind"], problem["reason"]) == (case.kind, case.reason.format(D=media)), name
    line = json.loads((tmp_path / "lines_problems.json").read_text())
    assert any(p["kind"] == "invalid_unicode" for p in line)
