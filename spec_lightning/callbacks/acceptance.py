"""Real acceptance length in the training loop: lossless speculative decoding at the end of every validation.

At the end of each validation epoch (not the sanity check) the callback cuts held-out conversations of the
datamodule's ``val_dataset`` before their first assistant token (the user turn with the generation prompt),
decodes them greedily with the *current* draft against the frozen target (chain of ``num_draft_tokens``, or the
algorithm's tree), and logs:

* ``val_accept_length``: τ, tokens emitted per target forward (accepted draft tokens + the target's own token;
  the prefill forward and its token excluded);
* ``val_accept_pos_{j}`` for j = 0..k-1: fraction of drafting rounds whose draft token j (0-based, as
  ``val_acc_{k}``/``val_top1_head{h}``) was accepted;
* a bar chart of acceptance by position (``val_accept_by_position``) to TensorBoard.

Under DDP each rank decodes its share of the prompts and the integer counts are summed across ranks.
Works for ``Eagle3Module`` (``module.draft``) and ``MedusaModule`` (``module.heads``), both with ``module.target``.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from spec_lightning.speculate.decode import speculative_generate
from spec_lightning.speculate.evaluate import AcceptanceStats, eos_token_ids, prompts_from_dataset, runner_and_drafter

log = logging.getLogger(__name__)


class AcceptanceLengthCallback(Callback):
    """Measure lossless acceptance length on held-out prompts after every validation.

    Args:
        num_prompts: held-out prompts decoded per validation (the first ones of ``val_dataset``).
        num_draft_tokens: chain length k (Medusa: at most its number of heads).
        max_new_tokens: tokens generated per prompt.
        max_prompt_tokens: skip prompts longer than this.
        mode: ``chain`` (greedy, k tokens) or ``tree`` (EAGLE-2 dynamic tree / Medusa sparse tree).
        log_figure: also log a bar chart of acceptance by position (TensorBoard loggers).
    """

    def __init__(self, num_prompts: int = 8, num_draft_tokens: int = 4, max_new_tokens: int = 64,
                 max_prompt_tokens: int | None = 1024, mode: Literal["chain", "tree"] = "chain",
                 log_figure: bool = True) -> None:
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
        self._prompts: list[list[int]] | None = None
        self.last_stats: AcceptanceStats | None = None

    def _held_out_prompts(self, trainer: Trainer) -> list[list[int]]:
        if self._prompts is None:
            dataset = getattr(trainer.datamodule, "val_dataset", None) if trainer.datamodule is not None else None
            if dataset is None:
                rank_zero_warn("AcceptanceLengthCallback: the datamodule has no val_dataset; acceptance length is "
                               "not measured")
                self._prompts = []
            else:
                self._prompts = prompts_from_dataset(dataset, self.num_prompts, self.max_prompt_tokens)
                if not self._prompts:
                    rank_zero_warn("AcceptanceLengthCallback: no held-out conversation has a user prompt before an "
                                   "assistant turn; acceptance length is not measured")
        return self._prompts

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prompts = self._held_out_prompts(trainer)
        if not prompts:
            return
        runner, drafter = runner_and_drafter(pl_module)
        k = self.num_draft_tokens if drafter.max_chain is None else min(self.num_draft_tokens, drafter.max_chain)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        eos = eos_token_ids(runner.model, tokenizer)
        stats = AcceptanceStats()
        for prompt in prompts[trainer.global_rank :: trainer.world_size]:
            stats.update(speculative_generate(runner, drafter, prompt, self.max_new_tokens, eos, mode=self.mode,
                                              num_draft_tokens=k))
        stats = self._reduce(trainer, stats, k if self.mode == "chain" else None)
        self.last_stats = stats
        pl_module.log("val_accept_length", float(stats.accept_length), rank_zero_only=True)
        rates = stats.position_rates
        for j, rate in enumerate(rates):
            pl_module.log(f"val_accept_pos_{j}", float(rate), rank_zero_only=True)
        if self.log_figure and trainer.is_global_zero:
            self._log_figure(trainer, rates, stats.accept_length)

    @staticmethod
    def _reduce(trainer: Trainer, stats: AcceptanceStats, positions: int | None) -> AcceptanceStats:
        """Sum the integer counts over ranks (every rank calls this)."""
        if trainer.world_size == 1:
            return stats
        width = positions if positions is not None else 64  # trees: a generous fixed width for the all-reduce
        def pad(xs: list[int]) -> list[int]:
            return (xs + [0] * width)[:width]
        counts = torch.tensor([stats.rounds, stats.emitted, *pad(stats.accepted_at), *pad(stats.drafted_at)],
                              dtype=torch.long, device=pl_device(trainer))
        counts = trainer.strategy.reduce(counts, reduce_op="sum").long().tolist()
        drafted = counts[2 + width:]
        depth = max((j + 1 for j, d in enumerate(drafted) if d), default=0)
        return AcceptanceStats(rounds=counts[0], emitted=counts[1], accepted_at=counts[2:2 + depth],
                               drafted_at=drafted[:depth])

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


def pl_device(trainer: Trainer) -> torch.device:
    return trainer.strategy.root_device
