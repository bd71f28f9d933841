"""The shell scripts are clean under shellcheck (installed from Debian when missing and root)."""
import os
import shutil
import subprocess

import pytest

from conftest import ROOT

SCRIPTS = sorted(str(p.relative_to(ROOT)) for d in ("slurm", "bench") for p in (ROOT / d).glob("*.sh")) + [".ci/run"]


def shellcheck() -> str | None:
    if shutil.which("shellcheck") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "shellcheck"], capture_output=True, timeout=300,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    return shutil.which("shellcheck")


def test_scripts_pass_shellcheck():
    tool = shellcheck()
    if tool is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    assert "slurm/pretrain.sh" in SCRIPTS and "slurm/prep_data.sh" in SCRIPTS
    # SC1091: .ci/run sources the venv it creates, which does not exist when it is checked.
    r = subprocess.run([tool, "-x", "-e", "SC1091", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:]
