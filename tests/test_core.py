"""Core pieces: atomic output directories, one-line config errors, the CLI's error handling."""

import subprocess
import sys

import pytest
from pydantic import BaseModel, ConfigDict

from mergetune.core.config import validate_model
from mergetune.core.errors import ConfigError, OutputExistsError
from mergetune.core.fs import atomic_output_dir


def test_atomic_dir_appears_only_on_success(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash mid-write")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(out) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (out / "done.txt").read_text() == "ok"


def test_atomic_dir_needs_force_to_replace(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="--force"):
        with atomic_output_dir(out):
            pass
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = 1


class _Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inner: _Inner
    name: str


def test_config_error_names_field_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        validate_model(_Outer, {"name": "a", "inner": {"sise": 2}}, "study.yaml")
    assert str(err.value) == "study.yaml: inner.sise: unknown key; allowed here: size"
    with pytest.raises(ConfigError, match=r"study.yaml: inner.size: .*integer"):
        validate_model(_Outer, {"name": "a", "inner": {"size": "big"}}, "study.yaml")


def test_cli_user_error_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "missing.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "mergetune.cli", "merge", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "missing.yaml" in proc.stderr
