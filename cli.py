"""spec_lightning command line: ``python cli.py {fit,validate,export} --config configs/<recipe>.yaml``.

``python cli.py regenerate --target ... --data ... --out data.jsonl`` answers a dataset's user turns with the
target itself (self-distilled training data; see ``spec_lightning.regenerate``).
"""

import sys

from lightning.pytorch.cli import LightningCLI

from spec_lightning.datamodules import ChatDataModule
from spec_lightning.modules.base import DraftModule
from spec_lightning.trainer import SpecTrainer


class SpecCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data is tokenised with the target's own tokenizer and chat template.
        parser.link_arguments("model.init_args.target", "data.init_args.tokenizer")
        parser.set_defaults({"data": {"class_path": "spec_lightning.datamodules.ChatDataModule"}})

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"},
                "evaluate": {"model", "datamodule"}}


def main(args=None, run: bool = True):
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "regenerate":  # not a Trainer subcommand: no LightningCLI needed
        from spec_lightning.regenerate import main as regenerate_main

        return regenerate_main(argv[1:])
    return SpecCLI(
        DraftModule,
        ChatDataModule,
        trainer_class=SpecTrainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # user errors: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
