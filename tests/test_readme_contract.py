"""The README's test command: one script that CI runs as it is, which installs the system
packages every test needs before it runs the suite."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from testhosts import MPI_PACKAGES, SSHD_PACKAGES, TestHostsError, require_mpi, require_sshd

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = ROOT / "scripts" / "system-packages.sh"


def _two_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_the_readme_test_command_is_one_script_that_ci_runs_as_it_is():
    test_command = _two_commands()[1]
    assert test_command == "scripts/test.sh"
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == f"exec {test_command}"
    assert "scripts/system-packages.sh" in (ROOT / test_command).read_text()


def test_the_script_lists_every_package_the_tests_require():
    listed = re.search(r"APT_PACKAGES=\((.*?)\)", SYSTEM.read_text(), re.S).group(1).split()
    assert set(SSHD_PACKAGES + MPI_PACKAGES) <= set(listed)


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("apt-get"), reason="installs Debian packages: needs root and apt-get"
)
def test_system_packages_are_installed_once_and_quietly_after():
    first = subprocess.run([SYSTEM], capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stderr
    try:
        require_sshd()
        require_mpi()
    except TestHostsError as e:
        pytest.fail(f"{e}\n{first.stderr}")
    again = subprocess.run([SYSTEM], capture_output=True, text=True, timeout=120)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")
