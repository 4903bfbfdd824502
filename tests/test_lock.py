"""Installs come from the lock: every exported requirement is pinned, hashed and uv.lock's own
version, so a fresh machine installs what was tested."""

from __future__ import annotations

import re
import tomllib

from tests.conftest import REPO


def locked() -> dict[str, set[str]]:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    versions: dict[str, set[str]] = {}
    for package in lock["package"]:
        versions.setdefault(package["name"], set()).add(package.get("version", ""))
    return versions


def test_every_export_is_the_locks_own_pinned_and_hashed():
    versions = locked()
    for name in ("test", "serve", "serve-gpu"):
        text = (REPO / "requirements" / f"{name}.txt").read_text()
        pins = re.findall(r"^([A-Za-z0-9_.-]+)==([^ ;\\\n]+)", text, re.M)
        assert len(pins) > 30, name
        for package, version in pins:
            assert version in versions[package.lower()], (name, package, version)
        requirements = [line for line in text.splitlines() if line and line[0].isalnum()]
        assert all("==" in line for line in requirements), name
        assert text.count("--hash=sha256:") >= len(pins), name
