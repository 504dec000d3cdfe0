"""Medusa heads (Cai et al., 2024; SPEC §4): K residual-SiLU MLP heads on the target's final hidden state.

Head h is ``num_layers`` residual blocks ``x = x + SiLU(W x + b)`` followed by its own
``lm_head_h: Linear(H -> V, no bias)``. W **and** b start at zero and the lm_heads start as copies of the
target's lm_head, so a fresh head reproduces the base model's logits exactly (the original FasterDecoding
code zero-initialises only W). Every block is its own module: the original code's ``[ResBlock] * n`` shares
one instance across layers.

Parameter names follow vLLM's ``MedusaModel`` (``blocks.{h}.layers.{l}.{weight,bias}``,
``lm_heads.{h}.weight``), so the vLLM export is the state dict as is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass
class MedusaConfig:
    """Shape of a set of Medusa heads.

    Args:
        hidden_size: H, the target's hidden size (input of its lm_head).
        vocab_size: V, the target's vocabulary size (every head predicts over the full vocabulary).
        num_heads: K, number of heads; head h (0-based) predicts the token h + 2 positions ahead.
        num_layers: residual blocks per head (``medusa_num_layers`` in the original code).
    """

    hidden_size: int
    vocab_size: int
    num_heads: int = 4
    num_layers: int = 1

    def __post_init__(self) -> None:
        for name in ("hidden_size", "vocab_size", "num_heads", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MedusaConfig.{name} must be a positive int, got {value!r}")

    @classmethod
    def tiny(cls, **overrides: int) -> MedusaConfig:
        """Matches ``tests/conftest.py::make_tiny_llama`` (H 32, V 128); 3 heads of 2 blocks."""
        return cls(**{"hidden_size": 32, "vocab_size": 128, "num_heads": 3, "num_layers": 2, **overrides})

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class MedusaBlock(nn.Module):
    """``num_layers`` residual layers ``x = x + SiLU(W x + b)`` (vLLM's ``ResidualBlock``)."""

    def __init__(self, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden_size, hidden_size, bias=True) for _ in range(num_layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in self.layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)  # SiLU(0) = 0: a fresh block is the identity

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = x + F.silu(layer(x))
        return x


class MedusaHeads(nn.Module):
    """K Medusa heads. ``forward(hidden [B, T, H]) -> logits [K, B, T, V]``."""

    def __init__(self, config: MedusaConfig) -> None:
        super().__init__()
        self.config = config
        h, v = config.hidden_size, config.vocab_size
        self.blocks = nn.ModuleList(MedusaBlock(h, config.num_layers) for _ in range(config.num_heads))
        self.lm_heads = nn.ModuleList(nn.Linear(h, v, bias=False) for _ in range(config.num_heads))

    @torch.no_grad()
    def init_from_lm_head(self, weight: Tensor) -> None:
        """Copy the target's lm_head weight ``[V, H]`` into every head's lm_head (and zero the blocks)."""
        expected = (self.config.vocab_size, self.config.hidden_size)
        if tuple(weight.shape) != expected:
            raise ValueError(f"lm_head weight must have shape {list(expected)} [V, H], got {list(weight.shape)}")
        for block, lm_head in zip(self.blocks, self.lm_heads, strict=True):
            block.reset_parameters()
            lm_head.weight.copy_(weight.to(lm_head.weight.dtype))

    def head_hidden(self, hidden: Tensor, head: int) -> Tensor:
        """Output of head ``head``'s residual blocks (the input of its lm_head): ``[..., H]``."""
        return self.blocks[head](hidden)

    def head_logits(self, hidden: Tensor, head: int) -> Tensor:
        """Head ``head``'s logits ``[..., V]`` (it predicts the token ``head + 2`` positions ahead)."""
        return self.lm_heads[head](self.head_hidden(hidden, head))

    def forward(self, hidden: Tensor) -> Tensor:
        """``hidden [..., H] -> logits [K, ..., V]``: every head (training and decoding call the same blocks)."""
        return torch.stack([self.head_logits(hidden, h) for h in range(self.config.num_heads)])
