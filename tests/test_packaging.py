"""The wheel holds what an installed lineray needs; job outputs stay out of git."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_carries_the_bundled_assets(tmp_path):
    """A real `pip wheel . --no-deps` (no build isolation: offline, the venv's setuptools)."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("lineray-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assets = {p.relative_to(REPO).as_posix() for p in (REPO / "lineray" / "assets").rglob("*") if p.is_file()}
    assert assets and assets <= names, assets - names
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "lineray").rglob("*.py")}
    assert modules <= names, modules - names
    assert not {n for n in names if n.startswith(("tests/", "configs/", "benchmarks/"))}
    assert "BuildBackendWarning" not in r.stderr, r.stderr


def test_job_outputs_are_ignored_by_git():
    r = subprocess.run(["git", "check-ignore", "-q", "outputs/digits/data/part-0.parquet"], cwd=REPO)
    assert r.returncode == 0, "outputs/ (where configs/jobs/digits.yaml writes) must be in .gitignore"
