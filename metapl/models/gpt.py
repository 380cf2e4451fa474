"""A small byte-level GPT (decoder-only transformer) for meta-gradients through language-model
training: tokens [B, T] (bytes, 0..255) -> next-token logits [B, T, 256].

Attention runs through the math path of ``F.scaled_dot_product_attention``: the fused kernels
(flash attention on CPU and CUDA, memory-efficient attention on CUDA) have a first-order
backward only, so differentiating the inner gradient through them fails, by double backward
("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
implemented") as by forward mode ("forward AD ... has not been implemented yet"). The math
path has both, under ``torch.func`` transforms and ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

VOCAB = 256  # bytes


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, heads, T, width / heads]
        with sdpa_kernel(SDPBackend.MATH):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, w))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Byte embeddings plus learned positions -> ``layers`` pre-norm blocks -> LayerNorm ->
    logits (the output layer shares the embedding's weights). ``context``: the longest input."""

    def __init__(self, context: int = 64, layers: int = 2, width: int = 64, heads: int = 4):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[-1]
        if t > self.context:
            raise ValueError(f"{t} tokens exceed the context of {self.context}")
        x = self.blocks(self.embed(tokens) + self.position[:t])
        return self.norm(x) @ self.embed.weight.T


def next_byte_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``, per sequence:
    logits [B, T, 256], tokens [B, T] -> [B] (nats per byte)."""
    b, t = tokens.shape
    losses = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), reduction="none"
    )
    return losses.view(b, t - 1).mean(1)
