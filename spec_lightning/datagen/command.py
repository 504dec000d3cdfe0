"""``python cli.py regenerate|synthesize ...``: a function's signature and docstring are its command line."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

# Arguments for Python callers only (an already loaded target, an open engine).
PYTHON_ONLY = {"model", "tokenizer", "runner"}


def run_command(function: Callable[..., Any], prog: str, description: str, args: list[str] | None) -> Any:
    """Parse ``args`` into ``function``'s arguments (jsonargparse reads types and the docstring's Args as help), call
    it, print its report (a dataclass) as one JSON line and return it."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(function, skip=PYTHON_ONLY)
    init = parser.instantiate_classes(parser.parse_args(args))
    names = [n for n in inspect.signature(function).parameters if n not in PYTHON_ONLY]
    report = function(**{n: init[n] for n in names if n in init})
    print(json.dumps(asdict(report)))
    return report
