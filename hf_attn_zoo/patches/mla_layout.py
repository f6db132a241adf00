"""The latent layout of one layer, computed from its q/k/v projections: which rotary components keep RoPE (as slots
of one shared RoPE key), the map from each query head to its DeepSeek-style query, and the factorisation of the
no-RoPE keys and the values into a latent. Pure tensor math on `[W b]` rows in float64 (see `patches/mla.py`).

A RoPE pair is a complex number `z = x_first + i x_second` that RoPE multiplies by `e^{i theta t}`. For frequency `i`,
any unitary mix of the KV heads' pairs, `z'_m = sum_j conj(V[j, m]) z_j`, commutes with RoPE, and a query head of KV
head `j` sees `z_j = sum_m V[j, m] z'_m` through the query `conj(V[j, m]) q`. A kept component `(i, m)` becomes a slot
of the shared RoPE key; what the kept components leave of each head's keys, `(I - V_K V_K^H) z`, loses RoPE and goes
into the latent with the values.

- `norm` / `high` / `low` / `uniform` (MHA2MLA): `V = I`, each KV head keeps `p` of its own pairs (by the 2-norm
  product of the query and key pair norms, or by frequency).
- `rorope` (TransMLA's RoRoPE): `V_i` the principal components of the keys' pairs across KV heads (complex PCA of
  `E[z z^H]`), which concentrates the positional information in few components; the `p x KV` components with the
  largest key x query norm keep RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "LatentLayout",
    "PairStatistics",
    "attention_metric",
    "choose_components",
    "factorise",
    "nope_width",
    "pair_statistics",
    "plan_layout",
]


@dataclass
class LatentLayout:
    """One layer's layout. `query_map` `[H, n + D, d]` maps a query head to `[no-RoPE part; RoPE slots]`;
    `rope_rows` `[D, hidden + 1]` are the shared RoPE key (slot firsts, then seconds: the `rotate_half` layout);
    `slot_pairs` `[D / 2, 2]` the channels (first, second) of the pair whose frequency turns each slot; `stacked`
    `[KV (n + d), hidden + 1]` the rows the latent reproduces (per KV head its `n` no-RoPE key rows, then its `d`
    value rows)."""

    query_map: torch.Tensor
    rope_rows: torch.Tensor
    slot_pairs: torch.Tensor
    stacked: torch.Tensor


def nope_width(selection: str, head_dim: int, keep: int) -> int:
    """No-RoPE key channels per KV head: what is left of its own channels, or all of them after a mix (`rorope`)."""
    return head_dim if selection == "rorope" and keep else head_dim - 2 * keep


def _energy(a: torch.Tensor, b: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """`E[(a . x~)(b . x~)]` for row batches `a`, `b` `[..., hidden + 1]`."""
    return ((a @ moment) * b).sum(-1)


def _kept_pairs(selection: str, keep: int, rotary: int, scores: torch.Tensor) -> torch.Tensor:
    """`[KV, keep]` pair ids (frequency index, 0 = fastest) each KV head keeps (MHA2MLA's rules)."""
    if selection == "norm":
        return scores.topk(keep, dim=1).indices.sort(dim=1).values
    if selection == "high":
        chosen = torch.arange(keep)
    elif selection == "low":
        chosen = torch.arange(rotary - keep, rotary)
    else:
        chosen = torch.linspace(0, rotary - 1, keep).round().long() if keep else torch.arange(0)
    return chosen.expand(scores.shape[0], -1)


@dataclass
class PairStatistics:
    """A layer's RoPE pairs as complex numbers: channel indices, key rows, the KV-head mixes and their scores
    (`pair_statistics`; computed once per layer, for the choice of slots and for the layout)."""

    firsts: torch.Tensor
    seconds: torch.Tensor
    kf: torch.Tensor  # [KV, P, hidden + 1]: first / second channel rows of each KV head's pairs
    ks: torch.Tensor
    mixes: torch.Tensor  # [P, KV (j), KV (m)] complex: component m of frequency i is sum_j conj(V[j, m]) z_j
    scores: torch.Tensor  # [P, KV]: how much each (frequency, component) matters


def pair_statistics(
    q_rows: torch.Tensor,
    k_rows: torch.Tensor,
    moment: torch.Tensor,
    heads: int,
    pairs: list[int],
    rotary: int,
    selection: str,
) -> PairStatistics:
    """The RoPE pairs of a layer whose projections have the rows `q_rows` `[H d, hidden + 1]` and `k_rows`
    `[KV d, hidden + 1]`, on inputs of second moment `moment`, paired as `pairs` (pair id per channel, `rotary`
    rotated pairs), scored for `selection`."""
    d = len(pairs)
    kv_heads = k_rows.shape[0] // d
    group = heads // kv_heads
    pair_of = torch.tensor(pairs)
    firsts = torch.tensor([int(torch.nonzero(pair_of == i)[0]) for i in range(rotary)], dtype=torch.long)
    seconds = torch.tensor([int(torch.nonzero(pair_of == i)[-1]) for i in range(rotary)], dtype=torch.long)
    keys, queries = k_rows.view(kv_heads, d, -1), q_rows.view(heads, d, -1)
    kf, ks = keys[:, firsts], keys[:, seconds]
    qf, qs = queries[:, firsts], queries[:, seconds]
    q_power = (_energy(qf, qf, moment) + _energy(qs, qs, moment)).clamp_min(0)  # [H, P]
    if selection == "rorope":
        # complex covariance of the KV heads' pairs per frequency: E[z_j conj(z_j')]
        kf_moment, ks_moment = kf @ moment, ks @ moment  # once per row, not once per pair of KV heads
        real = torch.einsum("jpi,kpi->jkp", kf_moment, kf) + torch.einsum("jpi,kpi->jkp", ks_moment, ks)  # [KV, KV, P]
        imag = torch.einsum("jpi,kpi->jkp", ks_moment, kf) - torch.einsum("jpi,kpi->jkp", kf_moment, ks)
        values, mixes = torch.linalg.eigh(torch.complex(real, imag).permute(2, 0, 1))  # ascending
        mixes, values = mixes.flip(-1), values.flip(-1).clamp_min(0)  # the largest component first
        seen = (mixes.abs() ** 2)[:, torch.arange(heads) // group]  # [P, H, m]: query head h's share of component m
        scores = (values * (seen * q_power.T[:, :, None]).mean(1)).sqrt()
    else:  # MHA2MLA: each KV head's own pairs, the 2-norm product of query and key
        mixes = torch.eye(kv_heads, dtype=torch.complex128).expand(rotary, -1, -1)
        k_power = (_energy(kf, kf, moment) + _energy(ks, ks, moment)).clamp_min(0)  # [KV, P]
        scores = (q_power.sqrt().view(kv_heads, group, rotary) * k_power.sqrt()[:, None]).mean(1).T
    return PairStatistics(firsts, seconds, kf, ks, mixes, scores)


def choose_components(scores: torch.Tensor, keep: int, selection: str) -> list[tuple[int, int]]:
    """The `(frequency, component)` slots that keep RoPE, `keep` per KV head's worth, by `selection` over `scores`
    `[P, KV]` (one layer's, or the sum over the model's layers for one choice shared by all)."""
    rotary, kv_heads = scores.shape
    if selection == "rorope":
        top = scores.flatten().topk(keep * kv_heads).indices.sort().values
        return [(int(t) // kv_heads, int(t) % kv_heads) for t in top]
    chosen = _kept_pairs(selection, keep, rotary, scores.T)
    return sorted((int(i), j) for j in range(kv_heads) for i in chosen[j])


def plan_layout(
    stats: PairStatistics,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    heads: int,
    keep: int,
    selection: str,
    kept: list[tuple[int, int]] | None = None,
) -> LatentLayout:
    """The layout of a layer with RoPE pairs `stats` (`pair_statistics`) and key and value rows `k_rows`, `v_rows`
    `[KV d, hidden + 1]`, keeping `keep` pairs' worth of RoPE per KV head (`selection`): the layer's own best
    `(frequency, component)` slots, or `kept` (a model-wide choice)."""
    firsts, seconds, kf, ks, mixes = stats.firsts, stats.seconds, stats.kf, stats.ks, stats.mixes
    kv_heads, rotary = kf.shape[0], kf.shape[1]
    d, group = k_rows.shape[0] // kv_heads, heads // kv_heads
    keys = k_rows.view(kv_heads, d, -1)
    eye = torch.eye(kv_heads, dtype=torch.complex128)
    if kept is None:
        kept = choose_components(stats.scores, keep, selection)

    def mix(coefficient: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair `coefficient * (first + i second)` (coefficients over the leading dim, summed)."""
        a, b = coefficient.real[:, None], coefficient.imag[:, None]
        return (a * first - b * second).sum(0), (b * first + a * second).sum(0)

    slots = len(kept)
    query_map_rope = torch.zeros(heads, 2 * slots, d, dtype=torch.float64)
    rope_first, rope_second = [], []
    for slot, (i, m) in enumerate(kept):
        first, second = mix(mixes[i, :, m].conj(), kf[:, i], ks[:, i])
        rope_first.append(first)
        rope_second.append(second)
        w = mixes[i, torch.arange(heads) // group, m].conj()  # [H]
        query_map_rope[:, slot, firsts[i]], query_map_rope[:, slot, seconds[i]] = w.real, -w.imag
        query_map_rope[:, slots + slot, firsts[i]], query_map_rope[:, slots + slot, seconds[i]] = w.imag, w.real
    # what the kept components leave of each KV head's keys: (I - V_K V_K^H) z per pair; other channels as they are
    residual = keys.clone()
    for i in range(rotary):
        components = [m for (pair, m) in kept if pair == i]
        if not components:
            continue
        chosen_mix = mixes[i][:, components]
        project = eye - chosen_mix @ chosen_mix.conj().T  # [KV, KV]
        for j in range(kv_heads):
            residual[j, firsts[i]], residual[j, seconds[i]] = mix(project[j], kf[:, i], ks[:, i])
    width = nope_width(selection, d, keep)
    if selection == "rorope" and keep:
        nope = torch.arange(d).expand(kv_heads, -1)
    else:
        own = torch.zeros(kv_heads, d, dtype=torch.bool)
        for i, j in kept:
            own[j, firsts[i]] = own[j, seconds[i]] = True
        nope = torch.arange(d).expand(kv_heads, -1)[~own].view(kv_heads, width)
    query_map = torch.zeros(heads, width + 2 * slots, d, dtype=torch.float64)
    query_map[:, :width] = torch.nn.functional.one_hot(nope[torch.arange(heads) // group], d).double()
    query_map[:, width:] = query_map_rope
    values = v_rows.view(kv_heads, d, -1)
    nope_rows = residual.gather(1, nope[:, :, None].expand(-1, -1, keys.shape[-1]))
    hidden1 = keys.shape[-1]
    return LatentLayout(
        query_map=query_map,
        rope_rows=torch.cat([torch.stack(rope_first), torch.stack(rope_second)])
        if slots
        else keys.new_zeros(0, hidden1),
        slot_pairs=torch.stack([firsts, seconds], dim=1)[[i for i, _ in kept]]
        if slots
        else torch.zeros(0, 2, dtype=torch.long),
        stacked=torch.cat([nope_rows, values], dim=1).reshape(-1, hidden1),
    )


def _sqrt_and_inverse(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`S`, `S^-1` with `S S = block` (symmetric positive semi-definite; tiny eigenvalues floored)."""
    values, vectors = torch.linalg.eigh(block)
    values = values.clamp_min(values.max().clamp_min(1e-300) * 1e-10)
    return (vectors * values.sqrt()) @ vectors.T, (vectors * values.rsqrt()) @ vectors.T


def attention_metric(
    stacked: torch.Tensor, moment: torch.Tensor, query_rows: torch.Tensor, out_weight: torch.Tensor, nope: int
) -> torch.Tensor:
    """`[KV, n + d, n + d]`: what an error in each KV head's no-RoPE keys and values costs the attention. A key error
    `e` moves the scores of the group's queries by `q . e`, so keys weigh by the queries' second moment
    (`query_rows` `[H, n, hidden + 1]`: each head's no-RoPE query rows); a value error reaches the output through
    `o_proj`, so values weigh by its Gram matrix (`out_weight` `[hidden, H, d]`). Each half is scaled to unit
    relative power, as the key/value balance does."""
    heads = query_rows.shape[0]
    d = out_weight.shape[-1]
    kv_heads = stacked.shape[0] // (nope + d)
    group = heads // kv_heads
    rows = stacked.view(kv_heads, nope + d, -1)
    blocks = []
    for j in range(kv_heads):
        members = slice(j * group, (j + 1) * group)
        keys, values = rows[j, :nope], rows[j, nope:]
        queries, outs = query_rows[members], out_weight[:, members]  # [G, n, hidden + 1], [hidden, G, d]
        on_keys = torch.einsum("gni,ik,gmk->nm", queries, moment, queries)
        on_values = torch.einsum("ogd,oge->de", outs, outs)
        if nope:
            on_keys = on_keys / torch.trace(on_keys @ keys @ moment @ keys.T).clamp_min(1e-300)
        on_values = on_values / torch.trace(on_values @ values @ moment @ values.T).clamp_min(1e-300)
        blocks.append(torch.block_diag(on_keys, on_values))
    return torch.stack(blocks)


def factorise(
    stacked: torch.Tensor,
    moment: torch.Tensor,
    rank: int,
    nope: int,
    kv_heads: int,
    fit: str,
    metric: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A, B)` with `B A` the rank-`rank` fit of `stacked` `[KV (n + d), hidden + 1]` on inputs of second moment
    `moment`, minimising `E |S (Y - B A) x~|^2`: `B = S^-1 U`, `A = U^T S Y` with `U` the top principal directions of
    `S Y M Y^T S`. `S` is the identity (`fit="kv"`), keys and values scaled to equal power (`balanced`, TransMLA), or
    the square root of `metric` (`attention`, see `attention_metric`). At full rank `A = Y` and `B = I`, exactly."""
    if rank >= stacked.shape[0]:
        return stacked, torch.eye(stacked.shape[0], dtype=torch.float64)
    size = stacked.shape[0] // kv_heads
    if fit == "attention" and metric is not None:
        roots = [_sqrt_and_inverse(block) for block in metric]
        root, inverse = torch.block_diag(*[r for r, _ in roots]), torch.block_diag(*[i for _, i in roots])
    else:
        scale = torch.ones(kv_heads, size, dtype=torch.float64)
        if fit == "balanced" and nope:
            power = _energy(stacked, stacked, moment).clamp_min(0).view(kv_heads, -1)
            key_power, value_power = power[:, :nope].sum(), power[:, nope:].sum()
            scale[:, :nope] = (value_power / key_power.clamp_min(1e-30)).sqrt()
        root, inverse = torch.diag(scale.flatten()), torch.diag(1 / scale.flatten())
    weighted = root @ stacked
    _, vectors = torch.linalg.eigh(weighted @ moment @ weighted.T)
    top = vectors[:, -rank:].flip(1)  # largest first
    return top.T @ weighted, inverse @ top
