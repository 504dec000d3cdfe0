"""The command line explains itself: every subcommand is listed with one line, every option of every subcommand (and
of every shipped model / data class behind ``--model.help`` / ``--data.help``) has a complete help text, and short
class names resolve."""

from __future__ import annotations

import argparse
import re

import pytest

import cli
from cli import main

# Lightning's own Trainer docstring, complete but ending in a quoted example instead of a full stop.
UPSTREAM_COMPLETE = {"--trainer.default_root_dir"}
EXPECTED_SUBCOMMANDS = {"fit", "validate", "export", "evaluate", "regenerate", "synthesize", "show-data", "cache"}
# Closing characters allowed after the final full stop: "(see ``x``)." or "... (``a`` or ``b``.)"
_END = re.compile(r"[.!?][)\]\"'`*]*$")


def help_problem(text: str | None) -> str | None:
    """Why ``text`` is not a complete help line, or None.

    Complete = not empty, ends a sentence (full stop, "!" or "?", optionally inside closing brackets or quotes), and
    its parentheses and ````literal```` markers are balanced: a docstring entry cut at a line break, or a
    description that stops mid-clause, fails at least one of these.
    """
    if text is None or not text.strip():
        return "no help"
    text = " ".join(text.split())
    if not _END.search(text):
        return f"does not end a sentence: ...{text[-40:]!r}"
    if text.count("(") != text.count(")"):
        return f"unbalanced parentheses: {text!r}"
    if text.count("``") % 2:
        return f"unbalanced ``literal``: {text!r}"
    return None


def test_help_problem_catches_cut_and_empty_texts():
    assert help_problem(None) == "no help"
    assert help_problem("  ") == "no help"
    assert help_problem("what to do with samples longer than") is not None
    assert help_problem("serving layout; ``sglang``") is not None
    assert help_problem("one of (a, b.") is not None
    assert help_problem("``None`` picks the default.") is None
    assert help_problem("a seed (see ``seed_everything``).") is None
    assert help_problem("layouts: ``sglang`` or ``vllm`` (EAGLE-3; the default is ``sglang``.)") is None


class _Built(Exception):
    pass


@pytest.fixture(scope="module")
def top_parser():
    """The parser ``python cli.py`` parses with, exactly as main() builds it (stopped before parsing)."""
    def stop(self, parser, args):
        raise _Built(parser)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli.SpecCLI, "parse_arguments", stop)
        with pytest.raises(_Built) as built:
            main(args=[])
    return built.value.args[0]


def _subcommands(parser) -> tuple[dict, dict]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices, {choice.dest: choice.help for choice in action._choices_actions}


def _problems(name: str, parser) -> list[str]:
    out = []
    for action in parser._actions:
        if (not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction)
                or action.option_strings[-1] in UPSTREAM_COMPLETE):
            continue
        problem = help_problem(action.help)
        if problem:
            out.append(f"{name} {action.option_strings[-1]}: {problem}")
    return out


def test_top_level_lists_every_subcommand_with_one_complete_line(top_parser, capsys):
    parsers, helps = _subcommands(top_parser)
    assert set(parsers) == EXPECTED_SUBCOMMANDS
    assert set(helps) == EXPECTED_SUBCOMMANDS
    assert [f"{name}: {p}" for name, text in helps.items() if (p := help_problem(text))] == []
    with pytest.raises(SystemExit):
        main(args=["--help"])
    printed = capsys.readouterr().out
    for name in EXPECTED_SUBCOMMANDS:
        assert re.search(rf"^\s+{re.escape(name)}\s+\S", printed, re.M), name
    assert not re.search(r"^\s+(test|predict)\s", printed, re.M)


@pytest.mark.parametrize("name", ["test", "predict"])
def test_unimplemented_trainer_subcommands_are_refused(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args=[name, "--config", "eagle3.yaml"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_every_trainer_subcommand_option_has_complete_help(top_parser):
    parsers, _ = _subcommands(top_parser)
    problems = [p for name in ("fit", "validate", "export", "evaluate") for p in _problems(name, parsers[name])]
    assert problems == []


def _shipped_classes(subcommand_parser, key: str) -> list[str]:
    from jsonargparse._typehints import get_all_subclass_paths

    action = next(a for a in subcommand_parser._actions if f"--{key}" in a.option_strings)
    return get_all_subclass_paths(action._typehint)


def _class_parser(subcommand_parser, key: str, class_path: str):
    """The parser ``--<key>.help <class_path>`` prints (jsonargparse's _ActionHelpClassPath.print_help)."""
    from jsonargparse import ArgumentParser
    from jsonargparse._util import import_object

    help_action = next(a for a in subcommand_parser._actions if f"--{key}.help" in a.option_strings)
    kwargs = dict(help_action.sub_add_kwargs)
    parser = ArgumentParser()
    parser.add_class_arguments(import_object(class_path), key, **kwargs)
    return parser


def test_every_shipped_model_and_data_class_option_has_complete_help(top_parser):
    fit = _subcommands(top_parser)[0]["fit"]
    models, datas = _shipped_classes(fit, "model"), _shipped_classes(fit, "data")
    # every algorithm file of spec_lightning.modules is known before parsing (short names resolve)
    assert {"Eagle3Module", "Medusa1Module", "Medusa2Module", "DraftLMModule", "DFlashModule"} <= {p.rsplit(".", 1)[1] for p in models}
    assert {"ChatDataModule", "FeatureCacheDataModule"} <= {p.rsplit(".", 1)[1] for p in datas}
    problems = [p for key, paths in (("model", models), ("data", datas)) for path in paths
                for p in _problems(path, _class_parser(fit, key, path))]
    assert problems == []


@pytest.mark.parametrize("name", ["Eagle3Module", "Medusa1Module", "Medusa2Module", "DraftLMModule", "DFlashModule"])
def test_short_model_names_resolve_in_model_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args=["fit", "--model.help", name])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert re.search(rf"Help for --model.help=spec_lightning\.modules\.\w+\.{name}\b", out), out[:300]
    assert "--model.target" in out


def test_short_data_name_resolves_in_data_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args=["fit", "--data.help", "FeatureCacheDataModule"])
    assert exit_.value.code == 0
    assert re.search(r"Help for --data.help=spec_lightning\.datamodules\.[\w.]*FeatureCacheDataModule\b",
                     capsys.readouterr().out)


def _tool_parser(name: str):
    """The parser each data tool of ``cli.py`` reads its arguments with."""
    if name == "cache":
        from spec_lightning.cache_cli import parser

        return parser()
    from jsonargparse import ArgumentParser

    from spec_lightning.datagen.command import PYTHON_ONLY

    if name == "show-data":
        from spec_lightning.datamodules.show import show as function
    elif name == "regenerate":
        from spec_lightning.datagen.regenerate import regenerate as function
    else:
        from spec_lightning.datagen.synthesize import synthesize as function
    parser = ArgumentParser()
    parser.add_function_arguments(function, skip=PYTHON_ONLY)
    return parser


@pytest.mark.parametrize("name", sorted(cli.TOOLS))
def test_every_data_tool_option_has_complete_help(name):
    assert _problems(name, _tool_parser(name)) == []


@pytest.mark.parametrize("name", sorted(cli.TOOLS))
def test_data_tool_help_runs(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args=[name, "--help"])
    assert exit_.value.code == 0
    assert f"cli.py {name}" in capsys.readouterr().out
