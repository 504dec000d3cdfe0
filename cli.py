"""spec_lightning command line: ``python cli.py {fit,validate,export,evaluate} --config <recipe>.yaml``.

``python cli.py regenerate --target ... --data ... --out data.jsonl`` answers a dataset's user turns with the
target itself (self-distilled training data; see ``spec_lightning.datagen.regenerate``);
``python cli.py synthesize --target ... --out data.jsonl`` has the target write both sides (Magpie);
``python cli.py show-data --target ... --data ...`` prints tokenised samples with the loss mask highlighted;
``python cli.py cache ...`` writes an offline feature cache (``spec_lightning.cache_cli``).
``python cli.py --help`` lists them all, one line each; ``python cli.py <subcommand> --help`` shows its options.

A bare config name that is not a file in the working directory is looked up in this repository's ``configs/``, so
``python cli.py fit --config medusa.yaml`` works from anywhere.
"""

import importlib
import logging
import pkgutil
import sys
import warnings
from pathlib import Path

if __name__ == "__main__":  # before torch loads: an allocator cannot be swapped later (spec_lightning.allocator)
    from spec_lightning.allocator import restart_with_tcmalloc

    try:
        restart_with_tcmalloc()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

from jsonargparse import ArgumentParser  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402

import spec_lightning.modules  # noqa: E402
from spec_lightning.callbacks import PreemptionCheckpoint  # noqa: E402
from spec_lightning.checkpoints import LIGHTNING_CKPT_NAMES, check_checkpoint_agrees  # noqa: E402
from spec_lightning.cli_flags import allow_bare_bool_flags  # noqa: E402
from spec_lightning.datamodules import ChatDataModule  # noqa: E402
from spec_lightning.errors import NonFiniteError  # noqa: E402
from spec_lightning.modules.base import DraftModule  # noqa: E402
from spec_lightning.modules.renamed import renamed_class_message  # noqa: E402
from spec_lightning.trainer import SpecTrainer  # noqa: E402

DESCRIPTION = ("spec_lightning: train speculative-decoding drafts (EAGLE-3, Medusa, DFlash, draft LMs) for a target "
               "model, evaluate and export them, and make their training data.")
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_HELP = ("Path to a configuration file in YAML or JSON. A bare name that is not a file in the working directory "
               f"is looked up in {CONFIGS_DIR} (e.g. --config medusa.yaml, --config variants/eagle3-human-data.yaml).")


def resolve_config_args(argv: list[str]) -> list[str]:
    """Rewrite ``--config NAME`` to ``configs/NAME`` when NAME is not a file here but is one in ``configs/``."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = _resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + _resolve_config(arg.split("=", 1)[1])
    return out


def _resolve_config(value: str) -> str:
    path = Path(value)
    if path.exists() or path.is_absolute():
        return value
    candidate = CONFIGS_DIR / path
    return str(candidate) if candidate.is_file() else value


def _regenerate():
    from spec_lightning.datagen.regenerate import main as regenerate_main

    return regenerate_main


def _show_data():
    from spec_lightning.datamodules.show import main as show_main

    return show_main


def _synthesize():
    from spec_lightning.datagen.synthesize import main as synthesize_main

    return synthesize_main


def _cache():
    from spec_lightning.cache_cli import main as cache_main

    return cache_main


# ``python cli.py <tool> ...``: data tools with their own arguments (``--help`` each), run before LightningCLI loads
# anything; listed in the top-level help with these lines.
TOOLS = {
    "regenerate": (_regenerate, "Self-distilled data: answer a dataset's user turns with the target itself "
                                "(JSONL with provenance)."),
    "synthesize": (_synthesize, "Data with no data: the target writes the user turns too (Magpie), then answers "
                                "them."),
    "show-data": (_show_data, "Print tokenised samples with the trainable (loss-mask) tokens highlighted."),
    "cache": (_cache, "Write (or --verify, --dry_run) the feature cache an offline config trains from."),
}


class _ConsoleFormat(logging.Formatter):
    """INFO lines as plain text (as Lightning prints its own), warnings and errors with their level."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno <= logging.INFO else f"{record.levelname}: {text}"


def configure_console() -> None:
    """``spec_lightning``'s INFO lines on the console, once (the first rank's only), and one known warning off.

    Routine lines (precision and allocator choices, data preparation) are INFO; a program that configured logging
    itself (root handlers) gets them through its own handlers instead.
    """
    logger = logging.getLogger("spec_lightning")
    logger.setLevel(logging.INFO)
    if not logger.handlers and not logging.getLogger().hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(_ConsoleFormat())
        handler.addFilter(lambda record: record.levelno > logging.INFO or rank_zero_only.rank == 0)
        logger.addHandler(handler)
        logger.propagate = False
    # Lightning 2.6's CombinedLoader flattens the dataloaders with its own copy of torch's tree_flatten
    # (lightning/pytorch/utilities/_pytree.py), which constructs ``LeafSpec()``; torch deprecates that with a
    # FutureWarning on every fit and validate, whatever the dataloaders (Lightning-AI/pytorch-lightning#21326).
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")


def import_draft_modules() -> None:
    """Import every file of ``spec_lightning.modules`` (the draft algorithms).

    jsonargparse resolves a short class name (``--model Eagle3Module``, ``--model.help Eagle3Module``) among the
    *loaded* subclasses of ``DraftModule``, so an algorithm must be imported before the command line is parsed.
    """
    for info in pkgutil.iter_modules(spec_lightning.modules.__path__, "spec_lightning.modules."):
        importlib.import_module(info.name)


def _data_link(model: DraftModule):
    return model.data_link


class SpecCLI(LightningCLI):
    def init_parser(self, **kwargs):
        parser = super().init_parser(**kwargs)
        for action in parser._actions:  # say where bare config names are looked up
            if "--config" in action.option_strings:
                action.help = CONFIG_HELP
        return parser

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        allow_bare_bool_flags(parser)  # --overwrite alone means --overwrite true
        return parser

    def add_arguments_to_parser(self, parser) -> None:
        # The data is tokenised with the target's own tokenizer and chat template.
        parser.link_arguments("model.init_args.target", "data.init_args.tokenizer")
        # One way from model to data (spec_lightning.contract): the datamodule gets the model's requirements and
        # hands its products (training tokens, cached features) back on the same link.
        parser.link_arguments("model", "data.init_args.link", compute_fn=_data_link, apply_on="instantiate")
        parser.set_defaults({"data": {"class_path": "spec_lightning.datamodules.ChatDataModule"}})

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Trainer subcommands: Lightning's ``fit``/``validate`` and ours (no module implements ``test``/``predict``,
        so they are not offered)."""
        lightning = LightningCLI.subcommands()
        return {"fit": lightning["fit"], "validate": lightning["validate"], "export": {"model", "datamodule"},
                "evaluate": {"model", "datamodule"}}

    def before_instantiate_classes(self) -> None:
        """A model class that was split or renamed (``MedusaModule``) fails with one line naming the class to use."""
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        model = config.get("model")
        if model is not None:
            message = renamed_class_message(model.get("class_path"), dict(model.get("init_args") or {}))
            if message:
                raise ValueError(message)

    def _add_subcommands(self, parser, **kwargs) -> None:
        """Lightning's Trainer subcommands, then the data tools, so ``cli.py --help`` lists all of them.

        A tool's entry only names it: main() hands ``cli.py <tool> ...`` to the tool's own parser before LightningCLI
        is built, and ``cli.py <tool> --help`` shows its options.
        """
        super()._add_subcommands(parser, **kwargs)
        for name, (_, line) in TOOLS.items():
            tool = ArgumentParser(description=f"{line} Options: python cli.py {name} --help.")
            parser._subcommands_action.add_subcommand(name, tool, help=line)

    def _parse_ckpt_path(self) -> None:
        """Check that ``--ckpt_path``'s saved hyper-parameters agree with the configured model (never merge them).

        LightningCLI's default silently replaces the config's model settings with the checkpoint's; here any
        difference is an error naming every conflicting field, and a file that is not a checkpoint gets one line.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if ckpt_path and ckpt_path not in LIGHTNING_CKPT_NAMES:  # those are checked when loaded (on_load_checkpoint)
            check_checkpoint_agrees(ckpt_path, self.config[subcommand].get("model"))


def main(args=None, run: bool = True):
    argv = sys.argv[1:] if args is None else list(args)
    configure_console()
    if argv and argv[0] in TOOLS:  # not Trainer subcommands: no LightningCLI needed
        return TOOLS[argv[0]][0]()(argv[1:])
    import_draft_modules()
    if args is None:  # from the shell: LightningCLI reads sys.argv itself
        sys.argv[1:] = resolve_config_args(argv)
    else:
        args = resolve_config_args(argv)
    return SpecCLI(
        DraftModule,
        ChatDataModule,
        trainer_class=SpecTrainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [PreemptionCheckpoint()]},  # SIGTERM: checkpoint, then exit 143
        parser_kwargs={"description": DESCRIPTION},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, NonFiniteError) as e:  # user errors and diverged runs: one clear line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3 if isinstance(e, NonFiniteError) else 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
