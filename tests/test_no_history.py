"""Code and help texts say what is; the git history and CHANGELOG.md say what was. What has and has
not run on real hardware lives in one place: the status table of docs/backends.md."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from densepure_rt.cli import main

ROOT = Path(__file__).resolve().parents[1]
#: History notes and hardware-status notes that belong in the git log or the status table.
HISTORY = re.compile(
    r"\bissues? #?\d+|\bpreviously\b|\bno longer\b|\bused to be\b|\bnot (yet )?run (by|on a GPU)\b|\bhas not run\b"
    r"|\bnot yet measured\b|\bthe previous loop\b|\bwhich it has not\b|\bbefore this (change|version|fix)\b",
    re.IGNORECASE,
)
SOURCES = sorted(p for folder in ("densepure_rt", "export", "engine") for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_source_file_carries_history_notes(path):
    found = [f"{i}: {line.strip()}" for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if HISTORY.search(line)]
    assert not found, found


@pytest.mark.parametrize("command", [None, "build", "certify", "predict", "report", "info"])
def test_no_help_text_carries_history_notes(command):
    text = CliRunner().invoke(main, [command, "--help"] if command else ["--help"]).stdout
    assert text.startswith("Usage:")
    assert not HISTORY.search(" ".join(text.split())), text


PUBLIC_MODULES = ["densepure_rt", "densepure_rt.runtime", "densepure_rt.errors", "densepure_rt.stats.cohen",
                  "densepure_rt.stats.sequential", "densepure_rt.stats.vote", "densepure_rt.files.results",
                  "densepure_rt.files.report", "densepure_rt.files.manifest", "densepure_rt.files.outputs",
                  "densepure_rt.files.data", "densepure_rt.schedule", "densepure_rt.limits", "densepure_rt.arguments",
                  "densepure_rt.executors.registry", "densepure_rt.certificates", "densepure_rt.spec", "densepure_rt.modes",
                  "densepure_rt.stats.selection", "densepure_rt.stats.fastpath", "densepure_rt.own_models"]


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_name_has_a_docstring(module):
    mod = importlib.import_module(module)
    missing = []
    for name in getattr(mod, "__all__", []):
        if name.startswith("__"):
            continue
        value = getattr(mod, name)
        if callable(value) or isinstance(value, type):
            if not (getattr(value, "__doc__", None) or "").strip():
                missing.append(name)
    assert not missing, missing
