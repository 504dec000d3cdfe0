"""Every file path and dotted name the guides mention exists (guides that name missing things mislead)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import spec_lightning

REPO = Path(__file__).resolve().parents[1]
GUIDES = sorted((REPO / "docs").glob("*.md"))
CODE = re.compile(r"`([^`\n]+)`")
PATH = re.compile(r"^[\w./-]+\.(?:py|yaml|md|sh)$")
DOTTED = re.compile(r"^spec_lightning(?:\.\w+)+$")
METHOD = re.compile(r"^([A-Z]\w+)\.(\w+)(?:\(.*\))?$")


def _classes() -> dict[str, type]:
    found: dict[str, type] = {}
    for info in pkgutil.walk_packages(spec_lightning.__path__, "spec_lightning."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and obj.__module__.startswith("spec_lightning"):
                found.setdefault(name, obj)
    return found


def _resolve(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("guide", GUIDES, ids=[g.name for g in GUIDES])
def test_every_mentioned_path_and_name_exists(guide):
    classes = _classes()
    missing = []
    for token in CODE.findall(guide.read_text()):
        token = token.strip()
        if PATH.match(token) and "/" in token and not token.startswith(("<", "exports/", "lightning_logs/")):
            if not (REPO / token).exists():
                missing.append(token)
        elif DOTTED.match(token):
            if not _resolve(token):
                missing.append(token)
        elif (m := METHOD.match(token)) and m.group(1) in classes:
            if not hasattr(classes[m.group(1)], m.group(2)):
                missing.append(token)
    assert not missing, f"{guide.name} mentions what does not exist: {missing}"


def test_the_guides_exist_and_the_readme_links_the_user_guide():
    assert {g.name for g in GUIDES} >= {"adding_an_algorithm.md", "user_guide.md"}
    assert "docs/user_guide.md" in (REPO / "README.md").read_text()
