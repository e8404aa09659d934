"""The oracle itself, checked against independent formulations of the same math."""
import math

import pytest
import torch
import torch.nn.functional as F

from prefixkern import reference


def _sdpa_concat(q, k, v, pk, pv, causal):
    """SDPA over the explicitly concatenated keys with causal_lower_right semantics."""
    B, Hq, S, D = q.shape
    Hkv, S_kv, P = k.shape[1], k.shape[2], pk.shape[-2]
    g = Hq // Hkv
    keys = torch.cat([pk.expand(B, -1, -1, -1), k], 2).repeat_interleave(g, 1)
    vals = torch.cat([pv.expand(B, -1, -1, -1), v], 2).repeat_interleave(g, 1)
    i = torch.arange(S)[:, None]
    j = torch.arange(P + S_kv)[None, :]
    mask = (j < P) | ((j - P) <= i + (S_kv - S)) if causal else torch.ones(S, P + S_kv, dtype=torch.bool)
    return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("S,S_kv", [(5, 5), (2, 9), (1, 4), (9, 4)])
def test_reference_matches_sdpa(causal, S, S_kv):
    torch.manual_seed(0)
    B, Hq, Hkv, P, D = 2, 4, 2, 3, 16
    q = torch.randn(B, Hq, S, D, dtype=torch.float64)
    k, v = torch.randn(2, B, Hkv, S_kv, D, dtype=torch.float64)
    pk, pv = torch.randn(2, Hkv, P, D, dtype=torch.float64)
    out, lse = reference.prefix_attention(q, k, v, pk, pv, causal=causal, return_lse=True)
    torch.testing.assert_close(out, _sdpa_concat(q, k, v, pk, pv, causal))
    assert lse.shape == (B, Hq, S) and torch.isfinite(lse).all()


def test_fully_padded_row_sees_prefix_only():
    B, H, S, P, D = 1, 1, 3, 2, 8
    q, k, v = torch.randn(3, B, H, S, D, dtype=torch.float64)
    pk, pv = torch.randn(2, H, P, D, dtype=torch.float64)
    mask = torch.zeros(B, S, dtype=torch.bool)
    out = reference.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask)
    expected = torch.softmax(q @ pk.transpose(-1, -2) / math.sqrt(D), -1) @ pv
    torch.testing.assert_close(out, expected)


def test_alibi_positions_follow_hf_bloom():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    pos = reference.alibi_key_positions(mask, 2, 3, 4, torch.device("cpu"))
    full = torch.cat([torch.ones(2, 3, dtype=torch.long), mask], -1)
    hf = ((full.cumsum(-1) - 1) * full).float()
    torch.testing.assert_close(pos, hf)


def test_window_can_move_past_the_prefix():
    vis = reference.prefix_attention_mask(1, 4, 2, 4, causal=True, key_padding_mask=None, window=2,
                                          device=torch.device("cpu"))[0, 0]
    # query 3 is at position 5: it sees positions 4 and 5 only (sequence keys 2, 3).
    assert vis[3].tolist() == [False, False, False, False, True, True]
    assert vis[0].tolist() == [False, True, True, False, False, False]


def test_mlp_layout_matches_peft_view_permute():
    P, d, h, L, Hkv, D = 5, 8, 12, 3, 2, 4
    E = torch.randn(P, d)
    w1, b1 = torch.randn(h, d), torch.randn(h)
    w2, b2 = torch.randn(2 * L * Hkv * D, h), torch.randn(2 * L * Hkv * D)
    out = reference.prefix_mlp(E, w1, b1, w2, b2, num_layers=L, num_kv_heads=Hkv, head_dim=D)
    rows = torch.tanh(E @ w1.T + b1) @ w2.T + b2
    # PEFT: view(B, P, 2L, Hkv, D).permute(2, 0, 3, 1, 4).split(2) -> layer l: [2, B, Hkv, P, D]
    peft = rows[None].view(1, P, 2 * L, Hkv, D).permute(2, 0, 3, 1, 4).split(2)
    for layer in range(L):
        torch.testing.assert_close(out[layer], peft[layer][:, 0])
