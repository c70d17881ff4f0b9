"""Every command's input mistakes are one clear error (exit 2, naming the file or the override, no
traceback), found before any model is loaded; storage errors (disk full, read-only, permissions) are one
message naming the path; any other exception keeps its traceback."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import click
import pytest
import typer

from internvl_lora import __version__
from internvl_lora.cli import app
from internvl_lora.config import load_config
from internvl_lora.errors import ConfigError


def assert_clean_error(p: subprocess.CompletedProcess, *named: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    for text in named:
        assert text in p.stderr, (text, p.stderr)


@pytest.fixture
def config_file(tmp_path):
    """A config whose only problems can come from the command line (its input paths exist)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "meta.jsonl").write_text("")
    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  path: {tmp_path / 'model'}\ndata:\n  meta: {tmp_path / 'meta.jsonl'}\n")
    return path


# -- configs and overrides ---------------------------------------------------------------------------

def test_override_value_yaml_cannot_parse(cli, config_file):
    p = cli("train", config_file, "train.lr=[1,")
    assert_clean_error(p, "override train.lr=[1,", "not valid YAML")


def test_tagged_override_is_refused_never_run(cli, config_file, tmp_path):
    marker = tmp_path / "ran"
    p = cli("train", config_file, f"train.lr=!!python/object/apply:os.system ['touch {marker}']")
    assert_clean_error(p, "override train.lr=!!python/object/apply:os.system", "tags")
    assert not marker.exists()
    p = cli("train", config_file, "train.lr=!!str 5")  # a harmless tag is refused too: values are plain data
    assert_clean_error(p, "override train.lr=!!str 5")


def test_config_that_is_a_folder(cli, tmp_path):
    p = cli("train", tmp_path)
    assert_clean_error(p, f"{tmp_path} is a folder")


def test_binary_config(cli, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x89\xff\xfe\x00\x01\x02binary")
    assert_clean_error(cli("train", path), str(path), "not a text file")
    path.write_bytes(b"model:\x00\x01\x02\n")  # UTF-8 but not YAML text
    assert_clean_error(cli("train", path), str(path), "not valid YAML")


def test_yaml_that_is_not_a_mapping(cli, tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- data\n")
    assert_clean_error(cli("train", path), str(path), "must be a mapping")


def test_override_mistakes_are_reported_against_the_override(cli, config_file):
    p = cli("train", config_file, "train.lrr=1e-4", "policy.r=0")
    assert_clean_error(p, "override train.lrr=1e-4: unknown key train.lrr (did you mean train.lr?)",
                       "override policy.r=0: policy.r must be >= 1")
    assert str(config_file) not in p.stderr  # the file is fine: the command line is to blame
    p = cli("train", config_file, "train=5", "train.lr=1")  # a value, then a key below it: no TypeError
    assert_clean_error(p, "override train.lr=1")


def test_file_problems_still_name_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lrr: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.epochs=x"], check=False)
    text = str(e.value)
    assert text.startswith(str(path))
    assert "  - unknown key train.lrr (did you mean train.lr?)" in text  # from the file: no override named
    assert "override train.epochs=x: train.epochs: 'x' is not of type float" in text


@pytest.mark.parametrize("key,suggested", [
    ("learning_rate", "train.lr"), ("train.learning_rate", "train.lr"), ("num_train_epochs", "train.epochs"),
    ("train.gradient_accumulation_steps", "train.grad_accum"), ("model.model_name_or_path", "model.path"),
    ("per_device_train_batch_size", "train.per_device_batch_size"), ("output_dir", "train.output_dir"),
    ("lora_r", "policy.r"), ("model_max_length", "data.max_length"), ("meta_path", "data.meta"),
    ("max_length", "data.max_length"),
])
def test_did_you_mean_knows_the_hugging_face_names(key, suggested):
    with pytest.raises(ConfigError, match=rf"unknown key {key} \(did you mean {suggested}\?\)"):
        load_config(None, [f"{key}=1"], check=False)


def test_did_you_mean_on_the_command_line(cli, config_file):
    assert_clean_error(cli("train", config_file, "learning_rate=1e-4"),
                       "override learning_rate=1e-4: unknown key learning_rate (did you mean train.lr?)")


# -- chat and validate: argument checks before the model is loaded ----------------------------------

def test_max_new_tokens_below_one(cli, tmp_path):
    not_a_model = tmp_path / "model"  # exists, but loading it would fail: the check must come first
    not_a_model.mkdir()
    assert_clean_error(cli("chat", not_a_model, "hi", "--max-new-tokens", "0"), "--max-new-tokens")
    assert_clean_error(cli("validate", "--base", not_a_model, "--tuned", not_a_model, "--data", not_a_model,
                           "--max-new-tokens", "0"), "--max-new-tokens")


def test_chat_missing_image_is_named_before_loading(cli, tmp_path):
    not_a_model = tmp_path / "model"
    not_a_model.mkdir()
    missing = tmp_path / "missing.jpg"
    p = cli("chat", not_a_model, "--image", missing, "what is it?")
    assert_clean_error(p, f"{missing}: image file not found")
    assert f"{missing}:0:" not in p.stderr


# -- version and help --------------------------------------------------------------------------------

def test_version(cli):
    p = cli("--version")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"internvl-lora {__version__}"


def test_train_help_shows_the_override_syntax(cli):
    p = cli("train", "--help")
    assert p.returncode == 0, p.stderr
    text = " ".join(p.stdout.split())
    assert "section.key=value" in text
    assert "train.lr=1e-4" in text  # an example
    assert "[a, b]" in text
    assert "docs/training.md" in text


def _walk(cmd: click.Command, path: str):
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _walk(sub, f"{path} {name}")


def test_every_command_argument_and_option_has_help():
    missing = []
    commands = list(_walk(typer.main.get_command(app), "internvl-lora"))
    assert len(commands) > 8
    for path, cmd in commands:
        if not (cmd.help or "").strip():
            missing.append(path)
        for param in cmd.params:
            if param.name != "help" and not (getattr(param, "help", None) or "").strip():
                missing.append(f"{path} {param.name}")
    assert not missing, f"no help text: {missing}"


# -- storage errors at the command boundary ----------------------------------------------------------

RAISE_IN_CONVERT = """
import errno, sys
import internvl_lora.data.convert as convert
def fail(*args, **kwargs):
    raise {exc}
convert.convert = fail
sys.argv = ["internvl-lora", "data", "convert", "in.jsonl", "out.jsonl"]
from internvl_lora.cli import main
main()
"""


def run_main_raising(exc: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RAISE_IN_CONVERT.format(exc=exc)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.mark.parametrize("code,advice", [("ENOSPC", "free some space"), ("EDQUOT", "quota"),
                                         ("EROFS", "read-only"), ("EACCES", "permission"), ("EPERM", "permitted")])
def test_storage_errors_are_one_message_naming_the_path(code, advice):
    p = run_main_raising(f"OSError(errno.{code}, 'os message', '/data/out/file.bin')")
    assert_clean_error(p, "/data/out/file.bin", advice)


def test_other_exceptions_keep_their_traceback():
    for exc in ("OSError(errno.EIO, 'i/o error', '/x')", "ValueError('a bug')"):
        p = run_main_raising(exc)
        assert p.returncode not in (0, 2), (exc, p.stderr)
        assert "Traceback" in p.stderr, (exc, p.stderr)

