"""FSDP for draft training: the frozen target and the trainable draft never share a sharding unit.

FSDP (1) flattens each unit's parameters into one ``FlatParameter``; a unit that mixes frozen and trainable weights
allocates gradient memory for the frozen ones too, and one that holds the whole target gathers it at once. The policy
here (:func:`split_units`) makes:

* one unit per target decoder block (the classes the HF model lists in ``_no_split_modules``): the bulk of the target,
  sharded (the strategy's ``sharding_strategy``) and gathered one block at a time;
* one unit per remaining *maximal frozen subtree*: the target without its blocks (embeddings, final norm, lm_head, tied
  or not), the EAGLE-3 draft's frozen embedding copy. These run ``frozen_sharding`` (default ``SHARD_GRAD_OP``: sharded
  between steps, kept gathered from their forward to the end of the step, because the modules call them outside their
  own forward, e.g. ``FrozenTarget.logits`` after the capture forward, which FSDP cannot see);
* the root unit: every trainable parameter (the draft, the Medusa heads), sharded.

:class:`DraftFSDPStrategy` is Lightning's ``FSDPStrategy`` with that policy as default, CPU support (gloo; FSDP needs
``device_id=cpu`` there) and gradient-norm clipping: Lightning's ``FSDPPrecision`` raises on
``gradient_clip_algorithm="norm"`` (it has no handle on the root module); :class:`ShardedNormClipPrecision` calls the
root's ``FullyShardedDataParallel.clip_grad_norm_``, the norm over all shards and units. ``gradient_clip_val`` in the
trainer config then works unchanged. Use from YAML (``configs/trainer/fsdp.yaml``)::

    trainer:
      strategy:
        class_path: spec_lightning.strategies.DraftFSDPStrategy
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn


def block_classes(root: nn.Module) -> set[str]:
    """Class names of the transformer blocks of every HF model inside ``root`` (``_no_split_modules``)."""
    names: set[str] = set()
    for module in root.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def split_units(root: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """``(blocks, frozen)``: the frozen transformer blocks and the other maximal frozen subtrees of ``root``.

    Everything else (the trainable parameters) stays in the root unit. A block with trainable parameters (Medusa-2's
    LoRA adapters live inside the target's blocks) is still its own unit, mixed by construction.
    """
    blocks_by_name = block_classes(root)
    blocks = [m for m in root.modules() if type(m).__name__ in blocks_by_name and m is not root]
    flags: dict[nn.Module, tuple[bool, bool]] = {}  # module -> (has params, all frozen)

    def visit(module: nn.Module) -> tuple[bool, bool]:
        has = any(True for _ in module.parameters(recurse=False))
        frozen = all(not p.requires_grad for p in module.parameters(recurse=False))
        for child in module.children():
            c_has, c_frozen = visit(child)
            has, frozen = has or c_has, frozen and c_frozen
        flags[module] = (has, frozen)
        return has, frozen

    visit(root)
    frozen_units: list[nn.Module] = []

    def collect(module: nn.Module) -> None:
        for child in module.children():
            has, frozen = flags[child]
            if not has:
                continue
            if frozen:
                frozen_units.append(child)  # maximal: its parent holds trainable parameters
            else:
                collect(child)

    if flags[root] == (True, True):
        return blocks, []  # nothing trainable: nothing to separate
    collect(root)
    return blocks, frozen_units


class ShardedNormClipPrecision(FSDPPrecision):
    """``FSDPPrecision`` whose norm clipping is the root FSDP module's ``clip_grad_norm_`` (norm over all shards)."""

    def __init__(self, precision: Any = "32-true", scaler: Any = None) -> None:
        super().__init__(precision, scaler)
        self.root: Any = None  # set by DraftFSDPStrategy once the model is wrapped

    def clip_grad_by_norm(self, optimizer: Any, clip_val: int | float) -> None:
        if self.root is None:
            raise RuntimeError("ShardedNormClipPrecision: gradient clipping before the model was wrapped by FSDP")
        self.root.clip_grad_norm_(clip_val)


class DraftFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with the frozen/trainable unit split, CPU (gloo) support and norm clipping.

    Args:
        sharding_strategy: for the target blocks and the trainable root unit (``FULL_SHARD``, ``SHARD_GRAD_OP``,
            ``HYBRID_SHARD``, ...).
        frozen_sharding: for the other frozen units (see the module docstring).
        state_dict_type: ``full`` (one checkpoint file, gathered on rank 0) or ``sharded``.
        cpu_offload: offload parameters and gradients to the CPU.
        **kwargs: any other ``FSDPStrategy`` / ``FullyShardedDataParallel`` argument (an explicit
            ``auto_wrap_policy`` replaces the split policy).
    """

    strategy_name = "draft_fsdp"

    def __init__(self, sharding_strategy: str = "FULL_SHARD", frozen_sharding: str = "SHARD_GRAD_OP",
                 state_dict_type: str = "full", cpu_offload: bool = False, **kwargs: Any) -> None:
        from torch.distributed.fsdp import ShardingStrategy

        if frozen_sharding not in ShardingStrategy.__members__:
            raise ValueError(f"frozen_sharding must be one of {list(ShardingStrategy.__members__)}, "
                             f"got {frozen_sharding!r}")
        super().__init__(sharding_strategy=sharding_strategy, state_dict_type=state_dict_type,
                         cpu_offload=cpu_offload, **kwargs)
        self.frozen_sharding = ShardingStrategy[frozen_sharding]
        self.units: tuple[list[nn.Module], list[nn.Module]] | None = None

    @property
    def precision_plugin(self) -> FSDPPrecision:
        return super().precision_plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin: Any) -> None:
        if type(plugin) is FSDPPrecision:  # Lightning's default: swap in the one that can clip by norm
            plugin = ShardedNormClipPrecision(plugin.precision, plugin.scaler)
        FSDPStrategy.precision_plugin.fset(self, plugin)

    def auto_wrap_policy(self, model: nn.Module):
        from torch.distributed.fsdp.wrap import CustomPolicy

        blocks, frozen = self.units = split_units(model)
        block_ids, frozen_ids = {id(m) for m in blocks}, {id(m) for m in frozen}

        def unit(module: nn.Module) -> bool | dict:
            if id(module) in block_ids:
                return True
            if id(module) in frozen_ids:
                return {"sharding_strategy": self.frozen_sharding}
            return False

        return CustomPolicy(unit)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        explicit = self.kwargs.pop("auto_wrap_policy", None)
        try:
            if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
                policy = explicit if explicit is not None else self.auto_wrap_policy(model)
                # Lightning passes ``device_id=root_device.index``: None on the CPU, which FSDP refuses there
                device_id = torch.device("cpu") if self.root_device.type == "cpu" else self.root_device.index
                model = FullyShardedDataParallel(
                    module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                    sharding_strategy=self.sharding_strategy, device_id=device_id, auto_wrap_policy=policy,
                    **self.kwargs)
            model = super()._setup_model(model)  # wrapped already: torchmetrics placement, activation checkpointing
        finally:
            if explicit is not None:
                self.kwargs["auto_wrap_policy"] = explicit
        plugin = self.precision_plugin
        if isinstance(plugin, ShardedNormClipPrecision):
            plugin.root = model
        return model

    # --- full checkpoints on the CPU ---------------------------------------------------------------------------
    # Lightning gathers full state dicts with ``offload_to_cpu=True``; when the parameters already live on the CPU,
    # FSDP frees the gathered storage under the "offloaded" copy and the next clone segfaults (seen with gloo,
    # torch 2.13). On the CPU the full state dicts are gathered without offloading.
    def _cpu_full_state_dict(self) -> bool:
        return self._state_dict_type == "full" and self.root_device.type == "cpu"

    def _full_state_dict_context(self):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.api import FullOptimStateDictConfig

        return FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                    FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
                                    FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True))

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if not self._cpu_full_state_dict():
            return super().lightning_module_state_dict()
        with self._full_state_dict_context():
            return self.model.state_dict()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        if not self._cpu_full_state_dict():
            return super().optimizer_state(optimizer)
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with self._full_state_dict_context():
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # the standard (parameter-id keyed) layout, as Lightning's
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state

