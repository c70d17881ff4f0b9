"""Broken input, end to end through the command line.

Every class of broken input (22 of them, some planted twice) sits in one meta file together with good
samples (see conftest.build_broken_dataset). `internvl-lora data check` must report each with its
kind and file:line, with counts per kind equal to what was planted, exit non-zero and print no
traceback; `train` must refuse with a clear message, and with data.skip_invalid=true train on the
valid samples and say how many it skipped.
"""

from __future__ import annotations

import json

import pytest

MAX_LENGTH = "1024"  # the demo config's data.max_length
TEMPLATE = "Hermes-2"  # a whole-string template, so that a tokenization mismatch can be planted too


@pytest.fixture(scope="module")
def check(cli):
    def run(meta, model, *extra):
        return cli("data", "check", meta, "--model", model, "--template", TEMPLATE, "--max-length", MAX_LENGTH, *extra)

    return run


def no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]


def test_at_least_fifteen_classes_are_planted(planted):
    assert len(planted.counts()) >= 15 and len(planted.expected) > len(planted.counts())  # some kinds twice


def test_data_check_reports_every_planted_problem(planted, demo, check):
    proc = check(planted.meta, demo / "model", "--json")
    no_traceback(proc)
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    got = [(p["kind"], p["path"], p["line"]) for p in report["problems"]]
    assert sorted(got) == sorted(planted.expected)  # each one, with its kind and file:line, nothing else
    assert report["problems_by_kind"] == planted.counts()
    assert report["valid"] == planted.valid and report["samples_per_epoch"] == planted.per_epoch
    assert report["invalid"] + report["meta_problems"] == len(planted.expected)
    assert report["videos"] == 1 and report["images"] == 6 and report["sample_types"] == {
        "image": 4, "multi_image": 1, "text": 1, "video": 1}
    for p in report["problems"]:
        assert p["message"] and "\n" not in p["message"]


def test_data_check_text_report(planted, demo, monkeypatch, capsys):
    """The human-readable report (the same command run in-process: the JSON run above is the subprocess one)."""
    code = run_main(monkeypatch, "data", "check", planted.meta, "--model", demo / "model", "--template", TEMPLATE,
                    "--max-length", MAX_LENGTH)
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err
    assert f"valid: {planted.valid}  with problems:" in out and "token-length histogram:" in out
    for kind, path, line in planted.expected:
        assert f"{path}:{line}: [{kind}] " in out, (kind, line)
    for kind, n in planted.counts().items():
        assert f"  {kind}: {n}  " in out


def run_main(monkeypatch, *args) -> int:
    """`internvl-lora ARGS` in this process, through the same entry point (its error handling included)."""
    from internvl_lora import cli as cli_module

    monkeypatch.setattr("sys.argv", ["internvl-lora", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        cli_module.main()
    return e.value.code


def test_unusable_meta_files_are_one_clean_error(tmp_path, demo, check, monkeypatch, capsys):
    proc = check(tmp_path / "nowhere.json", demo / "model")
    no_traceback(proc)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "nowhere.json" in proc.stderr and "[missing_meta]" in proc.stderr
    (tmp_path / "meta.json").write_text('{"a": {"root": ".", "annotation": "x.jsonl",}}')
    code = run_main(monkeypatch, "data", "check", tmp_path / "meta.json", "--model", demo / "model")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and "[bad_meta]" in err and "not valid JSON" in err and "meta.json:1" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_train_refuses_bad_data_and_skips_it_when_asked(planted, demo, tmp_path, cli):
    base = [demo / "train.yaml", f"data.meta={planted.meta}", f"model.template={TEMPLATE}",
            f"data.max_length={MAX_LENGTH}", "train.max_steps=2", "train.per_device_batch_size=2", "train.report_to=[]",
            "train.logging_steps=1"]
    proc = cli("train", *base, f"train.output_dir={tmp_path / 'refused'}")
    no_traceback(proc)
    assert proc.returncode == 2, proc.stderr[-2000:]
    n = len(planted.expected)
    assert f"found {n} bad sample(s)" in proc.stderr and "data.skip_invalid=true" in proc.stderr
    assert not (tmp_path / "refused" / "adapter").exists()

    proc = cli("train", *base, "data.skip_invalid=true", f"train.output_dir={tmp_path / 'run'}")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping {n} invalid sample(s)" in proc.stdout
    assert f"valid: {planted.valid}" in proc.stdout and f"per epoch (after repeat_time): {planted.per_epoch}" in proc.stdout
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
    meta = json.loads((tmp_path / "run" / "adapter" / "internvl_lora.json").read_text())
    assert meta["global_step"] == 2 and meta["template"] == TEMPLATE
