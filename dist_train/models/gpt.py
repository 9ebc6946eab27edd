"""``gpt``: a small decoder-only transformer (GPT-2 style) for byte-level language modelling.

Token + learned position embeddings, ``n_layer`` pre-LayerNorm blocks (causal self-attention,
4x GELU MLP), a final LayerNorm and a language-model head. Input [B, T] token ids with
T <= ``info.seq_len``; output [B, T, vocab] logits.

Tied embeddings: the head has no weight of its own, it multiplies by ``wte.weight``. The tie
is one Parameter registered once, so nothing can untie it: ``to_empty()`` (which makes a fresh
Parameter per registration and would split a ``lm_head.weight = wte.weight`` tie), state dicts,
FSDP and DeepSpeed all see a single tensor. The embedding and the head then live in the root
module, which FSDP shards as one unit, apart from the per-Block units.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.models.registry import register_model

# GPT-2's init: every weight ~ N(0, 0.02); residual output projections are further scaled by
# 1/sqrt(2 * n_layer) so the residual stream's variance does not grow with depth.
INIT_STD = 0.02


def _dropout(p: float) -> nn.Module:
    # No Dropout module at all when p == 0: the model then has no randomness in train mode.
    return nn.Dropout(p) if p > 0 else nn.Identity()


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.out_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = dropout
        self.resid_dropout = _dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, channels = x.shape
        q, k, v = self.qkv(x).split(channels, dim=2)
        # [B, T, C] -> [B, n_head, T, head_dim]
        q, k, v = (t.view(batch, time, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        # Attention dropout only while training: eval must be deterministic.
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(batch, time, channels)
        return self.resid_dropout(self.out_proj(y))


class FeedForward(nn.Module):
    """Linear(4x) -> GELU -> Linear -> Dropout."""

    def __init__(self, n_embd: int, dropout: float):
        super().__init__()
        self.in_proj = nn.Linear(n_embd, 4 * n_embd)
        self.act = nn.GELU()
        self.out_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = _dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.out_proj(self.act(self.in_proj(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)). The unit FSDP shards."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = FeedForward(n_embd, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer: embeddings -> Blocks -> LayerNorm -> head."""

    block_classes: tuple[type[nn.Module], ...] = (Block,)

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        n_layer: int,
        n_head: int,
        n_embd: int,
        dropout: float,
        tie_embeddings: bool,
    ):
        super().__init__()
        self.seq_len = seq_len
        self.n_layer = n_layer
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(seq_len, n_embd)
        self.drop = _dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        # Tied: no lm_head module, forward uses wte.weight (see the module docstring for why).
        self.lm_head = None if tie_embeddings else nn.Linear(n_embd, vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: [B, T] token ids (any integer dtype), T <= seq_len -> [B, T, vocab] logits."""
        time = x.shape[1]
        if time > self.seq_len:
            raise ValueError(f"sequence length {time} exceeds the model's seq_len {self.seq_len}")
        # Byte datasets may hand out uint8; nn.Embedding wants int64 (or int32) indices.
        if x.dtype not in (torch.int64, torch.int32):
            x = x.long()
        pos = torch.arange(time, device=x.device)
        h = self.drop(self.wte(x) + self.wpe(pos))
        for block in self.blocks:
            h = block(h)
        h = self.ln_f(h)
        if self.lm_head is None:
            return F.linear(h, self.wte.weight)
        return self.lm_head(h)

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init in module order: N(0, 0.02) weights, zero biases, unit LayerNorms,
        residual output projections scaled by 1/sqrt(2 * n_layer)."""
        resid_std = INIT_STD / math.sqrt(2 * self.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = resid_std if name.endswith("out_proj") else INIT_STD
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()


@register_model("gpt", tasks=("language_model",))
def build_gpt(cfg: Any, info: Any) -> GPT:
    """Build ``gpt`` for a language-model dataset (vocab = ``info.num_classes``)."""
    g = cfg.gpt
    n_layer, n_head, n_embd = int(g.n_layer), int(g.n_head), int(g.n_embd)
    if n_layer < 1:
        raise ValueError(f"model.gpt.n_layer must be >= 1, got {n_layer}")
    if n_head < 1 or n_embd % n_head != 0:
        raise ValueError(
            f"model.gpt.n_head={n_head} must divide model.gpt.n_embd={n_embd} "
            "(each head gets n_embd / n_head channels)"
        )
    if not info.seq_len or int(info.seq_len) < 1:
        raise ValueError(f"model.name={cfg.name!r} needs a dataset with a seq_len, got {info.seq_len!r}")
    return GPT(
        vocab_size=int(info.num_classes),
        seq_len=int(info.seq_len),
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        dropout=float(cfg.dropout),
        tie_embeddings=bool(g.tie_embeddings),
    )
