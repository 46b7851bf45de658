"""`make help` lists every target the Makefile documents with a `## ` comment, and the first install says
what it is doing (no silent pip) and installs torch through scripts/install-torch.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAKEFILE = ROOT / "Makefile"
_DOCUMENTED = re.compile(r"^([^\s:#=]+):[^=].*?## (.+)$", re.MULTILINE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def documented_targets() -> dict[str, str]:
    return {target: text.strip() for target, text in _DOCUMENTED.findall(MAKEFILE.read_text())}


def make_help() -> str:
    make = shutil.which("make")
    if make is None:
        pytest.skip("needs make on PATH (Debian: apt-get install make)")
    result = subprocess.run([make, "-s", "--no-print-directory", "help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return _ANSI.sub("", result.stdout)


def test_help_lists_every_documented_target() -> None:
    targets = documented_targets()
    assert {"help", "venv", "dev", "test", "e2e", "chart-readme"} <= set(targets)
    listed = {
        line.split()[0]: " ".join(line.split()[1:]) for line in make_help().splitlines() if line.strip()
    }
    assert {t: text for t, text in targets.items() if listed.get(t) != text} == {}


def test_first_install_shows_progress_and_installs_the_cpu_torch() -> None:
    stamp = re.search(r"^\$\(STAMP\):.*?\n((?:\t.*\n)+)", MAKEFILE.read_text(), re.MULTILINE)
    assert stamp, "the $(STAMP) rule"
    recipe = stamp.group(1)
    assert "scripts/install-torch.py" in recipe
    assert not re.search(r"pip install[^\n]*\s-q\b", recipe), "pip runs quietly for minutes"
    assert len(re.findall(r"@echo", recipe)) >= 3
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/install-torch.py --require-cpu" in ci
    assert not re.search(r"pip install[^\n]*torch", ci), "CI installs torch through install-torch.py only"
