"""scripts/: setup.sh installs once and then skips pip while pyproject.toml is unchanged; run-example keeps
Prefect's home inside the project and runs the digits example through the flow. Run on copies of the
scripts and pyproject.toml whose .venv/bin/ tools are stand-ins that record how they were called."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.services import REPO

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/calls.log"
if [ -n "${FAIL_PIP:-}" ]; then exit 1; fi
"""


@pytest.fixture
def project(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    py = tmp_path / ".venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    return tmp_path


def _setup(project, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = project / ".venv" / "bin" / "calls.log"
    log.unlink(missing_ok=True)
    r = subprocess.run(["bash", str(project / "scripts" / "setup.sh")], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", **env})
    return r, (log.read_text().splitlines() if log.exists() else [])


def test_first_run_installs_and_says_so(project):
    r, calls = _setup(project)
    assert r.returncode == 0, r.stderr
    assert any("pip install" in c and "torch==2.13.0" in c for c in calls)
    assert any("pip install" in c and "-e .[test]" in c for c in calls)
    assert "installing into .venv" in r.stdout and "first time" in r.stdout
    assert not any(" -q " in f" {c} " for c in calls if "torch==" in c or "-e .[test]" in c)  # pip shows progress


def test_an_unchanged_pyproject_skips_pip(project):
    _setup(project)
    r, calls = _setup(project)
    assert r.returncode == 0 and calls == []
    assert "setup: .venv is current" in r.stdout


def test_a_changed_pyproject_installs_again(project):
    _setup(project)
    with open(project / "pyproject.toml", "a") as f:
        f.write("\n# changed\n")
    r, calls = _setup(project)
    assert r.returncode == 0 and any("-e .[test]" in c for c in calls)


def test_a_failed_install_is_retried_next_time(project):
    r, _ = _setup(project, FAIL_PIP="1")
    assert r.returncode != 0
    r, calls = _setup(project)
    assert r.returncode == 0 and any("-e .[test]" in c for c in calls)


def test_run_example_keeps_prefects_home_in_the_project_unless_one_is_set(project):
    shutil.copy(REPO / "scripts" / "run-example", project / "scripts" / "run-example")
    _setup(project)  # .venv is current from here on: setup.sh no longer calls python
    (project / ".venv" / "bin" / "python").write_text('#!/usr/bin/env bash\necho "PREFECT_HOME=$PREFECT_HOME args=$*"\n')

    def run(**env):
        r = subprocess.run(["bash", str(project / "scripts" / "run-example")], capture_output=True, text=True,
                           timeout=60, env={"PATH": "/usr/bin:/bin", **env})
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines()[-1]

    assert run() == f"PREFECT_HOME={project / '.prefect'} args=-m examples.digits_flow"
    assert run(PREFECT_HOME="/srv/prefect") == "PREFECT_HOME=/srv/prefect args=-m examples.digits_flow"
