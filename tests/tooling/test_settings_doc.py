"""docs/architecture.md lists exactly the environment variables the settings models read (make docs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "settings-doc.py"


def test_the_committed_variable_tables_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_the_tables_name_what_the_builders_render() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for name in ("KUBESPEECH_API_KEYS_FILE", "KUBESPEECH_WORKER_ENGINE", "KUBESPEECH_LICENSE_PORT",
                 "KUBESPEECH_API_CACHE__ASR__KEY_FILE", "KUBESPEECH_LOG_LEVEL", "KUBESPEECH_OPERATOR_POD_NAME"):  # fmt: skip
        assert f"`{name}`" in doc, name
