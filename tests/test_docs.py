"""The README and the guides cannot drift: every path, dotted name, link and anchor they mention exists, and every
``python cli.py ...`` / ``python benchmarks/...`` command they show parses (nothing is run; ``doc_commands``)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import spec_lightning
from tests.doc_commands import broken_links, check, commands, is_elided

REPO = Path(__file__).resolve().parents[1]
GUIDES = sorted((REPO / "docs").glob("*.md"))
RESULTS = sorted((REPO / "benchmarks" / "results").glob("*.md"))
FRONT = [REPO / "README.md", *GUIDES]  # the pages whose commands a user copies
PAGES = [*FRONT, *RESULTS]
# Files another branch adds (the lead merges them together); checked like any other once they exist.
PENDING = {"docs/reliability.md"}

CODE = re.compile(r"`([^`\n]+)`")
PATH = re.compile(r"^[\w./-]+\.(?:py|yaml|md|sh)$")
DOTTED = re.compile(r"^spec_lightning(?:\.\w+)+$")
METHOD = re.compile(r"^([A-Z]\w+)\.(\w+)(?:\(.*\))?$")


def _classes() -> dict[str, type]:
    found: dict[str, type] = {}
    for info in pkgutil.walk_packages(spec_lightning.__path__, "spec_lightning."):
        try:
            module = importlib.import_module(info.name)
        except ModuleNotFoundError as e:  # only an optional engine may be missing (vLLM's connector subclass)
            if e.name is None or e.name.split(".")[0] != "vllm":
                raise
            continue
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


@pytest.mark.parametrize("guide", PAGES, ids=[g.relative_to(REPO).as_posix() for g in PAGES])
def test_every_mentioned_path_and_name_exists(guide):
    classes = _classes()
    missing = []
    for token in CODE.findall(guide.read_text()):
        token = token.strip()
        if PATH.match(token) and "/" in token and not token.startswith(("<", "exports/", "lightning_logs/")):
            if not (REPO / token).exists() and token not in PENDING:
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


def test_the_readme_is_a_front_door():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    # the set-up commands CI (.ci/run) and install.sh expect, verbatim
    assert "bash install.sh && python cli.py fit --config configs/medusa.yaml" in text
    assert "bash install.sh test && python -m pytest" in text


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(REPO).as_posix() for p in PAGES])
def test_every_link_and_anchor_exists(page):
    assert not broken_links(page, PENDING), f"{page.name}: broken links"


DOC_COMMANDS = [c for page in PAGES for c in commands(page)]


def test_the_pages_show_commands():
    runnable = [c for c in DOC_COMMANDS if not is_elided(c)]
    tools = {c.text.split()[2] for c in runnable if c.text.startswith("python cli.py")}
    assert tools >= {"fit", "evaluate", "export", "regenerate", "synthesize", "show-data", "cache"}, tools
    assert any(c.text.startswith("python benchmarks/") for c in runnable)


@pytest.mark.parametrize("cmd", [c for c in DOC_COMMANDS if not is_elided(c)], ids=lambda c: c.source)
def test_every_documented_command_parses(cmd, monkeypatch):
    monkeypatch.chdir(REPO)
    problem = check(cmd)
    assert problem is None, f"{cmd.source}: `{cmd.text}` does not parse: {problem}"


@pytest.mark.parametrize("text", [
    "python cli.py fit --config configs/medusa.yaml --model.init_args.num_headz 3",    # a renamed model flag
    "python cli.py fit --config configs/no_such_recipe.yaml",                          # a config that is gone
    "python cli.py evaluate --config configs/eagle3.yaml --ckpt_path a.ckpt --draft_dir exports/x",  # both sources
    "python cli.py regenerate --target t --data d --out o.jsonl --batch_sise 4",       # a tool's typo
    "python benchmarks/speculate_speed.py --draft_dir exports/eagle3",                 # a required flag left out
])
def test_the_checker_catches_a_broken_command(text, monkeypatch):
    """The command check is not a rubber stamp: each of these lines must be refused."""
    monkeypatch.chdir(REPO)
    from tests.doc_commands import Command

    assert check(Command("by hand", text)) is not None
