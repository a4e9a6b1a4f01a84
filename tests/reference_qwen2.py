"""An independent, from-scratch Qwen2 encoder forward in plain torch (no transformers code), used as an oracle.

RMSNorm, rotary embeddings (rotate-half convention), grouped-query attention with a padding-only (bidirectional)
mask, SwiGLU MLP, final norm, then mean pooling over real tokens and L2 normalisation: KaLM-V2's embedding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def reference_embeddings(weights: dict[str, Tensor], config, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Sentence embeddings (batch, hidden) for right- or left-padded ``input_ids`` (positions count real tokens)."""
    w = {k.removeprefix("model."): v.double() for k, v in weights.items()}
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // n_heads
    batch, length = input_ids.shape
    mask = attention_mask.bool()

    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0).double()  # (B, T)
    inv_freq = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2).double() / head_dim))
    angles = positions[..., None] * inv_freq  # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, hd)
    cos, sin = angles.cos(), angles.sin()

    x = w["embed_tokens.weight"][input_ids]  # (B, T, H)
    key_mask = torch.where(mask, 0.0, -math.inf)[:, None, None, :]  # (B, 1, 1, T): padding keys only
    for layer in range(config.num_hidden_layers):
        p = f"layers.{layer}."
        h = _rms_norm(x, w[p + "input_layernorm.weight"], config.rms_norm_eps)
        q = h @ w[p + "self_attn.q_proj.weight"].T + w[p + "self_attn.q_proj.bias"]
        k = h @ w[p + "self_attn.k_proj.weight"].T + w[p + "self_attn.k_proj.bias"]
        v = h @ w[p + "self_attn.v_proj.weight"].T + w[p + "self_attn.v_proj.bias"]
        q = q.view(batch, length, n_heads, head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(batch, length, n_kv, head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(batch, length, n_kv, head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(n_heads // n_kv, dim=1)  # (B, nh, T, hd)
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + key_mask  # (B, nh, T, T)
        attended = scores.softmax(-1) @ v  # (B, nh, T, hd)
        attended = attended.transpose(1, 2).reshape(batch, length, n_heads * head_dim)
        x = x + attended @ w[p + "self_attn.o_proj.weight"].T
        h = _rms_norm(x, w[p + "post_attention_layernorm.weight"], config.rms_norm_eps)
        gate = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T)
        x = x + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    x = _rms_norm(x, w["norm.weight"], config.rms_norm_eps)  # (B, T, H)
    m = mask[..., None].double()
    pooled = (x * m).sum(1) / m.sum(1)  # (B, H)
    return torch.nn.functional.normalize(pooled, dim=-1)
