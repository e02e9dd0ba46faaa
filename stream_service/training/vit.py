"""The SOARTC ViT: one token per SOARTC block, a class token, pass/fail logits and the class-token attention.

Input: (N, g, g, C) float32 token features of N windows (stream_service.vision.tokens). Outputs:
``logits`` (N, 2) [pass, fail] and ``attention`` (N, g, g), the class token's attention over the tokens
in the last layer, averaged over heads (each window's map sums to 1). Training can supervise that
attention with box-derived token targets, which turns it into the highlight filter.

Attention is written out (no fused kernels) so that the ONNX export carries the attention weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class VitConfig:
    """Shape of the model; stored in the model card."""

    grid: int = 16
    channels: int = 24
    dim: int = 64
    depth: int = 3
    heads: int = 4
    mlp_ratio: int = 2
    dropout: float = 0.0
    attention: str = "last-layer"  # the exported map: "last-layer" or "rollout"

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(n, t, d)
        return self.proj(out), weights


class Block(nn.Module):
    def __init__(self, cfg: VitConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, cfg.dim * cfg.mlp_ratio),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.dim * cfg.mlp_ratio, cfg.dim),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, weights = self.attn(self.norm1(x))
        x = x + a
        return x + self.mlp(self.norm2(x)), weights


class SoartcViT(nn.Module):
    """Windows of SOARTC tokens -> (logits (N, 2), class-token attention (N, g, g), token logits (N, g, g))."""

    def __init__(self, cfg: VitConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Sequential(nn.Linear(cfg.channels, cfg.dim), nn.GELU(), nn.Linear(cfg.dim, cfg.dim))
        self.pos = nn.Parameter(torch.zeros(1, cfg.grid * cfg.grid, cfg.dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, 2)
        self.token_head = nn.Linear(cfg.dim, 1)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)

    def encode(self, tokens_nggc: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(normalised tokens (N, 1 + g*g, dim), per-layer attention weights [(N, heads, T, T)])."""
        n, g = tokens_nggc.shape[0], self.cfg.grid
        x = self.embed(tokens_nggc.reshape(n, g * g, self.cfg.channels)) + self.pos
        x = torch.cat([self.cls.expand(n, -1, -1), x], dim=1)
        layers = []
        for block in self.blocks:
            x, weights = block(x)
            layers.append(weights)
        return self.norm(x), layers

    def forward_all(self, tokens_nggc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, g = tokens_nggc.shape[0], self.cfg.grid
        x, layers = self.encode(tokens_nggc)
        # The class token also attends to itself: renormalise over the tokens so that each map sums to 1.
        attention = layers[-1][:, :, 0, 1:].mean(dim=1)
        attention = (attention / attention.sum(dim=1, keepdim=True)).reshape(n, g, g)
        token_logits = self.token_head(x[:, 1:]).reshape(n, g, g)
        return self.head(x[:, 0]), attention, token_logits

    def forward(self, tokens_nggc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, 2), the class token's attention (N, g, g) as ``cfg.attention`` names it)."""
        if self.cfg.attention == "rollout":
            x, layers = self.encode(tokens_nggc)
            return self.head(x[:, 0]), rollout(layers, self.cfg.grid)
        logits, attention, _ = self.forward_all(tokens_nggc)
        return logits, attention


def rollout(layers: list[torch.Tensor], grid: int) -> torch.Tensor:
    """Attention rollout of the class token over the tokens, (N, g, g), each map summing to 1.

    Abnar & Zuidema (2020): each layer's head-mean attention plus the identity (the residual path),
    rows renormalised, multiplied through the layers. Only the class token's row is carried, so the
    cost is a vector-matrix product per layer.
    """
    row: torch.Tensor | None = None
    for weights in reversed(layers):
        a = weights.mean(dim=1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype)
        a = a / a.sum(dim=-1, keepdim=True)
        row = a[:, 0] if row is None else torch.einsum("nt,nts->ns", row, a)
    assert row is not None
    maps = row[:, 1:]
    return (maps / maps.sum(dim=1, keepdim=True)).reshape(-1, grid, grid)
