"""Trainer with the extra subcommands LightningCLI exposes (``python cli.py export ...``, ``evaluate``).

LightningCLI builds a subcommand's parser from the Trainer method of the same name, so extra
subcommands are methods here; ``fit``/``validate`` stay Lightning's own.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from lightning.fabric.connector import _PRECISION_INPUT
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn

from spec_lightning.allocator import active_allocator
from spec_lightning.callbacks.summary import DraftModelSummary
from spec_lightning.checkpoint_io import SpaceCheckedCheckpointIO
from spec_lightning.checkpoints import REMOTE_PREFIXES, load_draft_weights
from spec_lightning.precision import allow_clipping_with_fused_optimizers, resolve_precision
from spec_lightning.run_directory import RunDirectory, picks_version_itself

log = logging.getLogger(__name__)


def check_evaluate_sources(ckpt_path: str | None, draft_dir: str | None) -> None:
    """``evaluate`` reads the draft from exactly one place: a fit checkpoint or an export."""
    if (ckpt_path is None) == (draft_dir is None):
        raise ValueError("evaluate needs exactly one of --ckpt_path (a fit checkpoint) or --draft_dir (an export)")


def eval_modules_outside_frozen_parts(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` in eval mode that are not inside a frozen part.

    A frozen part is a module with parameters, none of which requires grad (the frozen target); everything inside it
    is meant to stay in eval mode. Elsewhere eval mode while training is likely a mistake (e.g. a pretrained HF
    model left in the eval mode ``from_pretrained`` returns, so its dropout is off).
    """
    frozen: list[str] = []
    out = []
    for name, module in model.named_modules():
        if any(f == "" or name == f or name.startswith(f + ".") for f in frozen):
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            frozen.append(name)
        elif not module.training:
            out.append(name)
    return out


class SpecTrainer(Trainer):
    def __init__(self, *, precision: _PRECISION_INPUT | Literal["auto"] | None = None, **kwargs) -> None:
        """Lightning's Trainer, with ``precision="auto"`` and gradient clipping under bf16-mixed with fused optimisers.

        Args:
            precision: Lightning's precision (``32-true``, ``bf16-mixed``, ``16-mixed``, ...; unset: ``32-true``)
                or ``auto``: ``bf16-mixed`` where bf16 is measured fast (GPUs, CPUs with AVX-512 BF16/AMX),
                ``32-true`` elsewhere (``spec_lightning.precision``).
            **kwargs: Lightning's other Trainer arguments.
        """
        given = kwargs.get("callbacks")
        given = list(given) if isinstance(given, (list, tuple)) else [given]  # Lightning appends to the list
        super().__init__(precision=resolve_precision(precision, kwargs.get("accelerator")), **kwargs)
        self._use_draft_model_summary(given)
        # Lightning warns about every module in eval mode when training starts, and the frozen target is hundreds of
        # them, by design (no dropout, whatever Lightning asks): warn only about eval modules outside frozen parts.
        self.fit_loop._warn_if_modules_in_eval_mode = self._warn_if_modules_in_eval_mode
        allow_clipping_with_fused_optimizers(self.strategy)
        if type(self.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default: check space before saving
            self.strategy.checkpoint_io = SpaceCheckedCheckpointIO()
        # each fit owns its log directory (its own version_N; an earlier or live run's directory is refused)
        self.run_directory = RunDirectory(choose_version=bool(self.loggers) and picks_version_itself(self.loggers[0]))
        if isinstance(self.accelerator, CPUAccelerator):
            log.info("memory allocator: %s (spec_lightning.allocator)", active_allocator())

    def _use_draft_model_summary(self, given: list) -> None:
        """Put :class:`DraftModelSummary` (no FLOPs column) in place of Lightning's default summary callback."""
        if any(isinstance(c, ModelSummary) for c in given):  # the user's own summary
            return
        self.callbacks[:] = [DraftModelSummary(max_depth=c._max_depth) if isinstance(c, ModelSummary) else c
                             for c in self.callbacks]

    def _warn_if_modules_in_eval_mode(self) -> None:
        """Lightning's warning at the start of training, for modules outside the frozen parts only."""
        names = eval_modules_outside_frozen_parts(self.lightning_module)
        if names:
            rank_zero_warn(f"Found {len(names)} module(s) in eval mode at the start of training outside the frozen "
                           f"parts of the model (e.g. {', '.join(names[:3])}); their dropout and other training behaviour is off.",
                           category=PossibleUserWarning)

    def fit(self, model: LightningModule, train_dataloaders=None, val_dataloaders=None,
            datamodule: LightningDataModule | None = None, ckpt_path: str | None = None,
            weights_only: bool | None = None) -> None:
        """Train the draft (Lightning's ``fit``; a resume checkpoint is always read with ``weights_only=True``).

        Args:
            model: the module to train.
            train_dataloaders: training dataloaders (or use ``datamodule``).
            val_dataloaders: validation dataloaders (or use ``datamodule``).
            datamodule: the data.
            ckpt_path: resume from this local checkpoint (``"last"`` for the newest of the run).
            weights_only: must stay ``None``/``True``; ``False`` is refused.

        ``weights_only=False`` would let a checkpoint file run code when it is unpickled, and Lightning's default
        for URLs is exactly that; remote checkpoints are refused (download them first).
        """
        if weights_only is False:
            raise ValueError("weights_only=False is refused: a checkpoint is read as data only (weights_only=True)")
        if ckpt_path is not None and str(ckpt_path).startswith(REMOTE_PREFIXES):
            raise ValueError(f"--ckpt_path {ckpt_path}: remote checkpoints are refused (they cannot be checked before "
                             "loading); download the file and pass its local path")
        self.run_directory.claim(self, ckpt_path)  # this run's own log directory (spec_lightning.run_directory)
        try:
            return super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path=ckpt_path,
                               weights_only=True)
        finally:
            self.run_directory.release()

    def export(
        self,
        model: LightningModule,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
        out_dir: str = "exports/draft",
        layout: str | None = None,
        overwrite: bool = False,
        weights_only: bool | None = None,
    ) -> Path:
        """Export a trained draft to a serving layout (SGLang/vLLM; Medusa also the original FasterDecoding one).

        Args:
            model: the module as configured for training (same config as ``fit``).
            datamodule: unused; accepted so the training config can be passed unchanged.
            ckpt_path: Lightning checkpoint written by ``fit``.
            out_dir: directory to write: a new path or an earlier export (its files are replaced); any other existing
                directory is refused unless ``overwrite``, an existing file always.
            layout: serving layout; unset: the algorithm's default (first named). EAGLE-3: ``sglang`` or ``vllm`` (the
                same files); Medusa: ``vllm`` or ``original`` (FasterDecoding); DFlash: ``vllm`` (SGLang reads the
                same files); draft LM: ``hf``.
            overwrite: write into an existing directory that is not an export (its other files are kept).
            weights_only: ignored (the checkpoint is always read with ``weights_only=True``); accepted so the
                ``config.yaml`` saved by ``fit`` can be passed unchanged.
        """
        if ckpt_path is None:
            raise ValueError("export needs --ckpt_path (a checkpoint written by `cli.py fit`)")
        load_draft_weights(model, ckpt_path)
        kwargs = {} if layout is None else {"layout": layout}
        out = model.export_draft(out_dir, overwrite=overwrite, **kwargs)
        print(f"exported draft to {out}")
        return out

    def evaluate(
        self,
        model: LightningModule,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
        draft_dir: str | None = None,
        prompts: str | None = None,
        num_prompts: int = 32,
        max_prompt_tokens: int = 1024,
        dump_prompts: str | None = None,
        max_new_tokens: int = 128,
        mode: str = "chain",
        num_draft_tokens: int = 4,
        temperature: float = 0.0,
        tree_topk: int = 4,
        tree_depth: int = 5,
        tree_total_tokens: int = 24,
        baseline: bool = True,
        check_lossless: bool = True,
        cpu_kernels: bool | None = None,
        seed: int = 0,
        weights_only: bool | None = None,
    ) -> dict:
        """Measure lossless acceptance length τ, per-position acceptance, tokens/s and speedup on held-out prompts.

        Args:
            model: the module as configured for training (its target is reloaded from ``target``).
            datamodule: source of the builtin held-out prompts (its validation split) when ``prompts`` is not given.
            ckpt_path: Lightning checkpoint written by ``fit``.
            draft_dir: an exported draft directory (EAGLE-3 SGLang/vLLM, Medusa vLLM/FasterDecoding, a draft LM)
                instead.
            prompts: held-out prompts: a packaged set (``heldout-chitchat``, ``heldout-instructions``; no recipe
                trains on them) or a conversation file (JSONL/JSON/parquet, OpenAI or ShareGPT records), each cut
                before its first assistant turn. Unset: the datamodule's validation split.
            num_prompts: prompts to decode.
            max_prompt_tokens: skip longer prompts.
            dump_prompts: also write the evaluated prompts' token ids to this JSON file.
            max_new_tokens: tokens generated per prompt.
            mode: ``chain`` or ``tree`` (a dynamic tree as in EAGLE-2; Medusa: its sparse tree of top-k choices).
            num_draft_tokens: chain length k.
            temperature: 0 = greedy verification; > 0 = lossless speculative sampling (chains).
            tree_topk: dynamic-tree branching (frontier nodes and children per node).
            tree_depth: dynamic-tree depth.
            tree_total_tokens: dynamic-tree size (draft tokens verified per round).
            baseline: also decode with the target alone (tokens/s, speedup).
            check_lossless: compare every greedy output with the target's own HF ``generate`` (untimed).
            cpu_kernels: run target and draft linears as few-row ``W @ x^T`` products (``speculate/skinny.py``);
                unset: on when both are float32 on the CPU and a quick measurement here finds it faster.
            seed: sampling seed.
            weights_only: ignored; accepted so the ``config.yaml`` saved by ``fit`` can be passed unchanged.
        """
        from spec_lightning.datamodules.prompts import prompts_from_dataset, prompts_from_file
        from spec_lightning.speculate import cpu_decode_kernels, eos_token_ids, evaluate_acceptance
        from spec_lightning.targets import load_tokenizer

        check_evaluate_sources(ckpt_path, draft_dir)
        if ckpt_path is not None:
            load_draft_weights(model, ckpt_path)
        else:
            if not Path(draft_dir).is_dir():
                raise FileNotFoundError(f"draft directory not found: {draft_dir}")
            model.configure_model()
            model.load_export(draft_dir)
        model.to(self.strategy.root_device).eval()
        tokenizer = getattr(datamodule, "tokenizer", None) or load_tokenizer(model.target_source)
        if prompts is not None:
            prompt_ids = prompts_from_file(prompts, tokenizer, num_prompts, max_prompt_tokens)
        else:
            if datamodule is None:
                raise ValueError("evaluate needs --prompts (a conversation file) or a datamodule (--data) for the "
                                 "held-out split")
            datamodule.prepare_data()
            datamodule.setup("fit")
            prompt_ids = prompts_from_dataset(datamodule.val_dataset, num_prompts, max_prompt_tokens)
            if not prompt_ids:
                raise ValueError("the datamodule's validation split has no conversation with a user prompt before an "
                                 "assistant turn")
        if dump_prompts is not None:  # the exact token ids, e.g. for the vLLM cross-check (scripts/vllm_acceptance.py)
            Path(dump_prompts).write_text(json.dumps(prompt_ids))
        target = model.decode_target()
        drafter = model.make_drafter(tree_topk, tree_depth, tree_total_tokens)
        with cpu_decode_kernels(target.model, drafter.model, enabled=cpu_kernels):
            report, _ = evaluate_acceptance(
                target, drafter, prompt_ids, max_new_tokens=max_new_tokens,
                eos_token_ids=eos_token_ids(target.model, tokenizer), mode=mode, num_draft_tokens=num_draft_tokens,
                temperature=temperature, baseline=baseline, check_lossless=check_lossless, seed=seed, progress=True,
                algorithm=type(model).__name__.removesuffix("Module").lower(),
            )
        print(report.table())
        print(report.to_json())
        return json.loads(report.to_json())
