"""Real acceptance length in the training loop: lossless speculative decoding at the end of every validation.

At the end of each validation epoch (not the sanity check) the callback cuts held-out conversations (the validation
split the datamodule handed back on the module's ``data_link``, ``spec_lightning.contract``) before their first
assistant token (the user turn with the generation prompt),
decodes them greedily with the *current* draft against the frozen target (chain of ``num_draft_tokens``, or the
algorithm's tree), and logs:

* ``val_accept_length``: τ, tokens emitted per target forward (accepted draft tokens + the target's own token;
  the prefill forward and its token excluded);
* ``val_accept_pos_{j}`` for j = 0..k-1: fraction of drafting rounds whose draft token j (0-based, as
  ``val_acc_{k}``/``val_top1_head{h}``) was accepted;
* a bar chart of acceptance by position (``val_accept_by_position``) to TensorBoard.

Under DDP each rank decodes its share of the prompts and the integer counts are summed across ranks (a torchmetrics
metric with sum reduction). Works for every module that says how it is decoded: ``make_drafter()`` and
``decode_target()`` (:class:`~spec_lightning.modules.base.DraftModule`).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from spec_lightning.datamodules.prompts import prompts_from_dataset
from spec_lightning.metrics import AcceptanceCounts
from spec_lightning.speculate import cpu_decode_kernels, eos_token_ids, speculative_generate
from spec_lightning.speculate.evaluate import AcceptanceStats

log = logging.getLogger(__name__)


class AcceptanceLengthCallback(Callback):
    """Measure lossless acceptance length on held-out prompts after every validation.

    Args:
        num_prompts: held-out prompts decoded per validation (the first ones of the validation split).
        num_draft_tokens: chain length k (Medusa: at most its number of heads).
        max_new_tokens: tokens generated per prompt.
        max_prompt_tokens: skip prompts longer than this.
        mode: ``chain`` (greedy, k tokens) or ``tree`` (EAGLE-2 dynamic tree / Medusa sparse tree).
        log_figure: also log a bar chart of acceptance by position (TensorBoard loggers).
        cpu_kernels: few-row CPU product kernels while decoding (``speculate/skinny.py``); None = on for fp32 on CPU.
    """

    def __init__(self, num_prompts: int = 8, num_draft_tokens: int = 4, max_new_tokens: int = 64,
                 max_prompt_tokens: int | None = 1024, mode: Literal["chain", "tree"] = "chain",
                 log_figure: bool = True, cpu_kernels: bool | None = None) -> None:
        for name, value in (("num_prompts", num_prompts), ("num_draft_tokens", num_draft_tokens),
                            ("max_new_tokens", max_new_tokens)):
            if value < 1:
                raise ValueError(f"AcceptanceLengthCallback.{name} must be >= 1, got {value}")
        if mode not in ("chain", "tree"):
            raise ValueError(f"AcceptanceLengthCallback.mode must be 'chain' or 'tree', got {mode!r}")
        self.num_prompts = num_prompts
        self.num_draft_tokens = num_draft_tokens
        self.max_new_tokens = max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.mode = mode
        self.log_figure = log_figure
        self.cpu_kernels = cpu_kernels
        self._prompts: list[list[int]] | None = None
        self._loaded_tokenizer = None
        self._warned_offline = False
        self.last_stats: AcceptanceStats | None = None

    def _held_out_prompts(self, pl_module: LightningModule) -> list[list[int]]:
        if self._prompts is None:
            rows = pl_module.data_link.validation_tokens
            if rows is None:
                rank_zero_warn("AcceptanceLengthCallback: no datamodule handed back a validation split (data_link); "
                               "acceptance length is not measured")
                self._prompts = []
            else:
                self._prompts = prompts_from_dataset(rows.read_rows(), self.num_prompts, self.max_prompt_tokens)
                if not self._prompts:
                    rank_zero_warn("AcceptanceLengthCallback: no held-out conversation has a user prompt before an "
                                   "assistant turn; acceptance length is not measured")
        return self._prompts

    def _tokenizer(self, source: str):
        """The target's tokenizer (its eos ids stop decoding), loaded once."""
        if self._loaded_tokenizer is None:
            from spec_lightning.targets import load_tokenizer

            self._loaded_tokenizer = load_tokenizer(source)
        return self._loaded_tokenizer

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if getattr(pl_module, "offline", lambda: False)():
            if not self._warned_offline:
                rank_zero_warn("AcceptanceLengthCallback: training reads cached target features (offline), so the target "
                               "is not loaded and acceptance length cannot be measured here; use `cli.py evaluate`")
                self._warned_offline = True
            return
        prompts = self._held_out_prompts(pl_module)
        if not prompts:
            return
        target, drafter = pl_module.decode_target(), pl_module.make_drafter()
        k = self.num_draft_tokens if drafter.max_chain is None else min(self.num_draft_tokens, drafter.max_chain)
        eos = eos_token_ids(target.model, self._tokenizer(pl_module.target_source))
        counts = AcceptanceCounts().to(target.device)
        with cpu_decode_kernels(target.model, drafter.model, enabled=self.cpu_kernels):
            for prompt in prompts[trainer.global_rank :: trainer.world_size]:
                result = speculative_generate(target, drafter, prompt, self.max_new_tokens, eos, mode=self.mode,
                                              num_draft_tokens=k)
                counts.update(result.accepted, result.drafted, result.emitted)
        summary = counts.compute()  # every rank calls compute(): the counts are summed across ranks
        self.last_stats = AcceptanceStats(rounds=int(summary["rounds"]), emitted=int(summary["emitted"]),
                                          accepted_at=summary["accepted_at"].tolist(),
                                          drafted_at=summary["drafted_at"].tolist())
        tau = float(summary["accept_length"])
        pl_module.log("val_accept_length", tau, rank_zero_only=True)
        rates = summary["position_rates"].tolist()
        for j, rate in enumerate(rates):
            pl_module.log(f"val_accept_pos_{j}", float(rate), rank_zero_only=True)
        if self.log_figure and trainer.is_global_zero:
            self._log_figure(trainer, rates, tau)

    @staticmethod
    def _log_figure(trainer: Trainer, rates: list[float], tau: float) -> None:
        experiment = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
        if experiment is None or not hasattr(experiment, "add_figure"):
            return
        from matplotlib.figure import Figure  # no pyplot: no global backend; TensorBoard renders it with Agg

        fig = Figure(figsize=(4, 3), dpi=100)
        ax = fig.subplots()
        ax.bar(range(len(rates)), rates, color="tab:blue")
        ax.set_xticks(range(len(rates)))
        ax.set_xlabel("draft position")
        ax.set_ylabel("acceptance rate")
        ax.set_ylim(0, 1)
        ax.set_title(f"acceptance by position (tau = {tau:.2f})")
        fig.tight_layout()
        experiment.add_figure("val_accept_by_position", fig, global_step=trainer.global_step, close=True)

