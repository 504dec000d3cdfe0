"""Find the commands, links and anchors the README and the guides show, and check them without running anything.

A command is parsed by the real parser of what it names — LightningCLI for ``python cli.py fit|validate|export|
evaluate``, each tool's own parser for ``regenerate``/``synthesize``/``show-data``/``cache``, argparse for
``python benchmarks/<script>.py`` — and stopped right after parsing (``parse_args`` is wrapped to raise ``Parsed``),
so nothing is loaded, trained or written.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import runpy
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import jsonargparse

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"```(?:bash|sh|console)?\n(.*?)```", re.S)
INLINE = re.compile(r"`(python (?:cli\.py|benchmarks/\w+\.py)\s[^`]+)`")  # may wrap onto the next line
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.M)


@dataclass(frozen=True)
class Command:
    source: str  # "README.md:42"
    text: str


class Parsed(Exception):
    """Raised by the wrapped ``parse_args`` once a command line has parsed."""

    def __init__(self, namespace):
        super().__init__("parsed")
        self.namespace = namespace


def commands(path: Path) -> Iterator[Command]:
    """Every ``python cli.py ...`` / ``python benchmarks/x.py ...`` command of a markdown file (fenced or inline)."""
    text = path.read_text()
    name = path.relative_to(REPO).as_posix()
    for block in FENCE.finditer(text):
        line_no = text.count("\n", 0, block.start(1)) + 1
        pending, start = "", line_no
        for i, line in enumerate(block.group(1).split("\n")):
            if not pending:
                start = line_no + i
            if line.rstrip().endswith("\\"):  # a continued line
                pending += line.rstrip()[:-1] + " "
                continue
            line, pending = (pending + line).strip(), ""
            if line.startswith(("python cli.py ", "python benchmarks/")):
                yield Command(f"{name}:{start}", line)
    for m in INLINE.finditer(text):
        if "\n\n" not in m.group(1):
            yield Command(f"{name}:{text.count(chr(10), 0, m.start()) + 1}", " ".join(m.group(1).split()))


def is_elided(cmd: Command) -> bool:
    """``...`` stands for "the rest as above", and a bare ``python cli.py synthesize`` names a tool in a sentence:
    neither is a command line to run as it stands."""
    return "..." in cmd.text or "…" in cmd.text or len(cmd.text.split()) <= 3


RUN_CONFIG = re.compile(r"(?:lightning_logs/(\w+)/version_\d+|<run>)/config\.yaml")


def concrete_args(text: str) -> list[str]:
    """The command's arguments with placeholders made concrete: a run's saved config becomes the recipe it was
    trained from, ``<k>`` a number, any other ``<...>`` a plain word; ``[--opt x]`` (optional) is kept."""
    def recipe(m: re.Match) -> str:
        name = m.group(1) or "eagle3"
        return f"configs/{name}.yaml" if (REPO / "configs" / f"{name}.yaml").is_file() else "configs/eagle3.yaml"

    text = RUN_CONFIG.sub(recipe, text)
    text = re.sub(r"configs/<\w+>\.yaml", "configs/eagle3.yaml", text)
    text = re.sub(r"<k>|<n>", "3", text)
    text = text.replace("<subcommand>", "fit")
    text = re.sub(r"<[^<>]*>", "placeholder", text)
    text = re.sub(r"\[(--[^\[\]]*)\]", r"\1", text)
    args = shlex.split(text, comments=True)[2:]  # drop "python <script>"
    # a placeholder standing alone ("<change>": any further flags) is not an option's value: drop it
    return [a for i, a in enumerate(args) if a != "placeholder" or (i and args[i - 1].startswith("--"))]


@contextlib.contextmanager
def stop_after_parsing():
    """Make the outermost ``parse_args`` (argparse or jsonargparse) raise ``Parsed`` instead of returning."""
    depth = [0]

    def wrap(original):
        def parse_args(self, *args, **kwargs):
            depth[0] += 1
            try:
                namespace = original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                raise Parsed(namespace)
            return namespace
        return parse_args

    with mock.patch.object(argparse.ArgumentParser, "parse_args", wrap(argparse.ArgumentParser.parse_args)), \
            mock.patch.object(jsonargparse.ArgumentParser, "parse_args",
                              wrap(jsonargparse.ArgumentParser.parse_args)):
        yield


def check(cmd: Command) -> str | None:
    """None when the command parses (and agrees with the rules checked at parse time); else why not."""
    script = shlex.split(cmd.text)[1]
    args = concrete_args(cmd.text)
    err = io.StringIO()
    try:
        with stop_after_parsing(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if script == "cli.py":
                import cli

                cli.main(args)
            else:
                with mock.patch.object(sys, "argv", [script, *args]):
                    runpy.run_path(str(REPO / script), run_name="__main__")
    except Parsed as parsed:
        return _agrees(script, parsed.namespace)
    except SystemExit as e:
        if e.code == 0 and ("--help" in args or "--print_config" in args):  # what the command asks for
            return None
        return f"exit {e.code}: {err.getvalue().strip().splitlines()[-1:] or ''}"
    except Exception as e:  # noqa: BLE001 - any failure to parse is the finding
        return f"{type(e).__name__}: {e}"
    return "the command did not reach its argument parser"


def _agrees(script: str, namespace) -> str | None:
    """Rules the parsers cannot express, checked by the library's own functions."""
    if script == "cli.py" and getattr(namespace, "subcommand", None) == "evaluate":
        from spec_lightning.trainer import check_evaluate_sources

        try:
            check_evaluate_sources(namespace.evaluate.get("ckpt_path"), namespace.evaluate.get("draft_dir"))
        except ValueError as e:
            return str(e)
    return None


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(path.read_text())}


def broken_links(path: Path, pending: set[str]) -> list[str]:
    """Relative links whose file or ``#anchor`` does not exist (web links are not followed)."""
    broken = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"^[a-z]+://|^mailto:", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        rel = dest.relative_to(REPO).as_posix() if dest.is_relative_to(REPO) else str(dest)
        if not dest.exists():
            if rel not in pending:
                broken.append(target)
        elif anchor and (dest.is_dir() or anchor not in anchors(dest)):
            broken.append(target)
    return broken
