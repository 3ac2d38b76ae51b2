"""A small GPT-style model and deterministic synthetic token data.

``accel_ms`` emulates an accelerator on a CPU-only host: every block's forward takes that many milliseconds more,
and its backward twice as many, spent *waiting* (as a host thread waits on a GPU kernel), with the CPU free for
other threads. Training computes exactly what it would without it; only the time changes. On a GPU machine the
checkpoint's copies, hashes and TCP run on the host CPU beside the GPU's compute; training on the CPU itself they
would compete with it instead (see calibrate.py beside this file).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass(frozen=True)
class ModelConfig:
    vocab: int = 256
    dim: int = 64
    layers: int = 2
    heads: int = 4
    seq: int = 32
    batch: int = 4  # sequences per rank per iteration
    accel_ms: float = 0.0  # emulated accelerator time per block forward (backward: twice), milliseconds
    exact_attention: bool = False  # attention by plain matrix products, whose backward is deterministic on a GPU


class _Accel(torch.autograd.Function):
    """Identity that waits ``seconds`` in forward and twice that in backward (the emulated kernels' time)."""

    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        time.sleep(seconds)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.seconds)
        return grad, None


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.accel_s = c.accel_ms / 1000
        self.exact = c.exact_attention
        self.ln1 = nn.LayerNorm(c.dim)
        self.attn = nn.MultiheadAttention(c.dim, c.heads, batch_first=True)
        self.ln2 = nn.LayerNorm(c.dim)
        self.mlp = nn.Sequential(nn.Linear(c.dim, 4 * c.dim), nn.GELU(), nn.Linear(4 * c.dim, c.dim))

    def forward(self, x, mask):
        h = self.ln1(x)
        # exact: the fused kernels' backward on a GPU adds up in an order that varies from run to run
        with sdpa_kernel(SDPBackend.MATH) if self.exact else nullcontext():
            x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return _Accel.apply(x, self.accel_s) if self.accel_s > 0 else x


class TinyGPT(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.emb = nn.Embedding(c.vocab, c.dim)
        self.pos = nn.Embedding(c.seq, c.dim)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.vocab)

    def forward(self, tokens):
        n = tokens.shape[1]
        mask = torch.triu(torch.full((n, n), float("-inf"), device=tokens.device), diagonal=1)
        x = self.emb(tokens) + self.pos(torch.arange(n, device=tokens.device))
        for b in self.blocks:
            x = b(x, mask)
        return self.head(self.ln(x))


def batch(c: ModelConfig, seed: int, iteration: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens rank ``rank`` trains on at ``iteration``: a pure function of (seed, iteration, rank)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + iteration * 1009 + rank)
    tokens = torch.randint(0, c.vocab, (c.batch, c.seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]
