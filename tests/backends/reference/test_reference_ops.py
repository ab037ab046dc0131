"""Reference ops against hand-computed values and straightforward formulas."""

import math

import pytest
import torch

from backends.reference.ops import ReferenceOps
from v4.ops import CompressSpec

ops = ReferenceOps("cpu")
D64 = torch.float64


# ---------------------------------------------------------------- mHC
def hc_params(n, D, comb_logits, pre_b=0.0, post_b=0.0):
    fn = torch.zeros((2 + n) * n, n * D, dtype=D64)  # zero projection: the mix is the bias alone
    base = torch.cat(
        [torch.full((n,), pre_b), torch.full((n,), post_b), torch.tensor(comb_logits, dtype=D64).flatten()]
    ).to(D64)
    return fn, base, torch.ones(3, dtype=D64)


def test_sinkhorn_one_iteration_is_softmax_then_column_normalisation():
    # rows softmax of [[0, ln 3], [0, 0]] = [[1/4, 3/4], [1/2, 1/2]]; column sums 3/4 and 5/4
    fn, base, scale = hc_params(2, 3, [[0.0, math.log(3)], [0.0, 0.0]])
    X = torch.randn(1, 2, 3, dtype=D64)
    _, _, comb = ops.hc_pre(X, fn, base, scale, sinkhorn_iters=1, hc_eps=0.0, norm_eps=1e-6)
    expect = torch.tensor([[1 / 3, 3 / 5], [2 / 3, 2 / 5]], dtype=D64)
    torch.testing.assert_close(comb[0], expect, rtol=0, atol=1e-12)


def test_sinkhorn_converges_to_the_doubly_stochastic_limit():
    # For A = [[a, b], [c, d]] Sinkhorn converges to [[p, 1-p], [1-p, p]], p = sqrt(ad) / (sqrt(ad) + sqrt(bc)).
    fn, base, scale = hc_params(2, 3, [[0.0, math.log(3)], [0.0, 0.0]])
    _, _, comb = ops.hc_pre(torch.randn(1, 2, 3, dtype=D64), fn, base, scale, 20, 0.0, 1e-6)
    a, b, c, d = 0.25, 0.75, 0.5, 0.5
    p = math.sqrt(a * d) / (math.sqrt(a * d) + math.sqrt(b * c))
    torch.testing.assert_close(comb[0], torch.tensor([[p, 1 - p], [1 - p, p]], dtype=D64), rtol=0, atol=1e-9)


def test_hc_pre_weights_and_collapse():
    n, D = 2, 3
    fn, base, scale = hc_params(n, D, [[0.0, 0.0], [0.0, 0.0]], pre_b=0.5, post_b=-1.0)
    X = torch.tensor([[[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]]], dtype=D64)
    eps = 1e-6
    u, post, comb = ops.hc_pre(X, fn, base, scale, 20, eps, 1e-6)
    pre = 1 / (1 + math.exp(-0.5)) + eps
    torch.testing.assert_close(u[0], pre * (X[0, 0] + X[0, 1]))
    torch.testing.assert_close(post[0], torch.full((2,), 2 / (1 + math.exp(1.0)), dtype=D64))


def test_hc_post_mixes_with_comb_transposed():
    X = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=D64)  # stream j = e_j
    comb = torch.tensor([[[0.2, 0.8], [0.6, 0.4]]], dtype=D64)
    post = torch.tensor([[1.0, 2.0]], dtype=D64)
    y = torch.tensor([[10.0, 20.0]], dtype=D64)
    out = ops.hc_post(y, X, post, comb)
    # X'_k = post_k y + sum_j comb[j, k] X_j
    expect = torch.tensor([[10 + 0.2, 20 + 0.6], [20 + 0.8, 40 + 0.4]], dtype=D64)
    torch.testing.assert_close(out[0], expect)


# ---------------------------------------------------------------- rope
def test_rope_rotates_interleaved_pairs_of_the_last_dims():
    inv = torch.tensor([0.5, 0.25], dtype=D64)
    x = torch.tensor([[7.0, 1.0, 0.0, 0.0, 1.0]], dtype=D64)  # nope dim 7 stays; pairs (1,0), (0,1)
    out = ops.rope(x, torch.tensor([2]), inv)
    a0, a1 = 2 * 0.5, 2 * 0.25
    expect = torch.tensor([[7.0, math.cos(a0), math.sin(a0), -math.sin(a1), math.cos(a1)]], dtype=D64)
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(ops.rope(out, torch.tensor([2]), inv, inverse=True), x)


# ---------------------------------------------------------------- attention
def test_attention_sink_is_an_extra_logit_with_zero_value():
    q = torch.tensor([[[1.0, 2.0]]], dtype=D64)  # [T=1, H=1, d=2]
    kv = torch.tensor([[0.5, -1.0], [2.0, 1.0]], dtype=D64)
    idx = torch.tensor([[0, 1, -1]], dtype=torch.int32)
    sink = torch.tensor([0.3], dtype=D64)
    out = ops.attention(q, kv, idx, None, None, sink, scale=0.5)
    l0, l1 = 0.5 * (0.5 - 2.0), 0.5 * (2.0 + 2.0)
    den = math.exp(l0) + math.exp(l1) + math.exp(0.3)
    expect = (math.exp(l0) * kv[0] + math.exp(l1) * kv[1]) / den
    torch.testing.assert_close(out[0, 0], expect)


def test_attention_joint_softmax_over_window_and_compressed_sources():
    q = torch.randn(3, 2, 4, dtype=D64)
    win, comp = torch.randn(5, 4, dtype=D64), torch.randn(6, 4, dtype=D64)
    widx = torch.tensor([[0, 1, -1], [2, -1, -1], [3, 4, 0]], dtype=torch.int32)
    cidx = torch.tensor([[5, -1], [-1, -1], [0, 2]], dtype=torch.int32)
    sink = torch.randn(2, dtype=D64)
    out = ops.attention(q, win, widx, comp, cidx, sink, 0.7)
    for t in range(3):
        keys = [win[i] for i in widx[t] if i >= 0] + [comp[i] for i in cidx[t] if i >= 0]
        K = torch.stack(keys)
        for h in range(2):
            e = torch.exp(0.7 * K @ q[t, h])
            torch.testing.assert_close(out[t, h], (e[:, None] * K).sum(0) / (e.sum() + torch.exp(sink[h])))


# ---------------------------------------------------------------- compressor
def _expected_entry(cand_kv, cand_z, pos, inv, eps):
    w = torch.softmax(cand_z, 0)
    c = (w * cand_kv).sum(0)
    c = c / torch.sqrt(c.square().mean() + eps)
    return ops.rope(c[None], torch.tensor([pos]), inv)[0]


def _compress_run(spec, kv, z, plan):
    m, c = spec.ratio, spec.dim
    k = 2 if spec.overlap else 1
    state_kv = torch.zeros(1, k * m, k * c, dtype=D64)
    state_z = torch.zeros_like(state_kv)
    pool = torch.zeros(4, 4, c, dtype=D64)
    table = torch.tensor([[2, 0, 1, 3]], dtype=torch.int32)  # logical block 0 -> physical block 2, ...
    ape = torch.zeros(m, k * c, dtype=D64)
    inv = torch.tensor([0.1], dtype=D64)
    pos = 0
    for n in plan:
        ops.compress(kv[pos:pos + n], z[pos:pos + n], ape, spec, torch.ones(c, dtype=D64), inv,
                     state_kv, state_z, pool, table, [(0, pos, n, 0)])
        pos += n
    phys = [int(table[0, j // 4]) * 4 + j % 4 for j in range(pos // m)]
    return pool.view(-1, c)[phys]


@pytest.mark.parametrize("plan", [[12], [1] * 12, [3, 5, 4], [7, 5]])
def test_overlapping_compressor_pools_previous_first_half_and_current_second_half(plan):
    m, c = 4, 2
    spec = CompressSpec(m, c, True, "none", 2, 1e-6)
    g = torch.Generator().manual_seed(0)
    kv, z = torch.randn(12, 2 * c, generator=g, dtype=D64), torch.randn(12, 2 * c, generator=g, dtype=D64)
    got = _compress_run(spec, kv, z, plan)
    assert got.shape == (3, c)
    inv = torch.tensor([0.1], dtype=D64)
    # entry 0: only the second halves of tokens 0..3 (window -1 does not exist)
    torch.testing.assert_close(got[0], _expected_entry(kv[0:4, c:], z[0:4, c:], 0, inv, 1e-6))
    for w in (1, 2):  # entry w: first halves of window w-1, second halves of window w, one softmax over 8
        ck = torch.cat([kv[(w - 1) * m:w * m, :c], kv[w * m:(w + 1) * m, c:]])
        cz = torch.cat([z[(w - 1) * m:w * m, :c], z[w * m:(w + 1) * m, c:]])
        torch.testing.assert_close(got[w], _expected_entry(ck, cz, w * m, inv, 1e-6))


@pytest.mark.parametrize("plan", [[8], [1] * 8, [3, 3, 2]])
def test_plain_compressor_pools_each_window_alone(plan):
    m, c = 4, 2
    spec = CompressSpec(m, c, False, "none", 2, 1e-6)
    g = torch.Generator().manual_seed(1)
    kv, z = torch.randn(8, c, generator=g, dtype=D64), torch.randn(8, c, generator=g, dtype=D64)
    got = _compress_run(spec, kv, z, plan)
    inv = torch.tensor([0.1], dtype=D64)
    for w in (0, 1):
        torch.testing.assert_close(
            got[w], _expected_entry(kv[w * m : (w + 1) * m], z[w * m : (w + 1) * m], w * m, inv, 1e-6)
        )


def test_compressor_emits_an_entry_only_when_its_window_closes():
    spec = CompressSpec(4, 2, True, "none", 2, 1e-6)
    kv, z = torch.randn(7, 4, dtype=D64), torch.randn(7, 4, dtype=D64)
    state_kv, state_z = torch.zeros(1, 8, 4, dtype=D64), torch.zeros(1, 8, 4, dtype=D64)
    pool = torch.zeros(2, 4, 2, dtype=D64)
    table = torch.zeros(1, 2, dtype=torch.int32)
    args = (
        torch.zeros(4, 4, dtype=D64),
        spec,
        torch.ones(2, dtype=D64),
        torch.tensor([0.1], dtype=D64),
        state_kv,
        state_z,
        pool,
        table,
    )
    assert ops.compress(kv[:3], z[:3], *args, [(0, 0, 3, 0)]).shape[0] == 0  # tokens 0..2: window open
    assert ops.compress(kv[3:7], z[3:7], *args, [(0, 3, 4, 0)]).shape[0] == 1  # token 3 closes entry 0 only


# ---------------------------------------------------------------- indexer
def test_indexer_causal_rule_and_padding():
    # 3 entries; entry 2 has by far the best key. Query t sees entries s < (t + 1) // 4.
    d = 2
    keys = torch.tensor([[1.0, 0.0], [0.5, 0.0], [100.0, 0.0]], dtype=D64)
    pool = torch.zeros(1, 4, d, dtype=D64)
    pool[0, :3] = keys
    table = torch.zeros(1, 1, dtype=torch.int32)
    positions = torch.tensor([2, 3, 7, 8, 11])
    q = torch.ones(5, 1, d, dtype=D64)
    w = torch.ones(5, 1, dtype=D64)
    got = ops.indexer_topk(q, w, pool, table, torch.zeros(5, dtype=torch.long), positions, ratio=4, topk=2)
    assert got.dtype == torch.int32
    assert got[0].tolist() == [-1, -1]  # t=2: no complete entry
    assert got[1].tolist() == [0, -1]  # t=3 closes entry 0
    assert got[2].tolist() == [0, 1]  # t=7: entries 0, 1 (best first)
    assert got[3].tolist() == [0, 1]  # t=8: still two
    assert got[4].tolist() == [2, 0]  # t=11: entry 2 now visible and best


def test_indexer_score_is_weighted_relu_sum():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=D64)  # two heads
    w = torch.tensor([[1.0, -2.0]], dtype=D64)
    keys = torch.tensor([[1.0, -3.0], [-1.0, 0.5], [0.2, 0.2]], dtype=D64)
    # scores: k0: 1*relu(1) - 2*relu(-3) = 1; k1: 1*0 - 2*0.5 = -1; k2: 0.2 - 0.4 = -0.2
    pool = torch.zeros(1, 4, 2, dtype=D64)
    pool[0, :3] = keys
    got = ops.indexer_topk(q, w, pool, torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, dtype=torch.long),
                           torch.tensor([11]), 4, 3)
    assert got[0].tolist() == [0, 2, 1]



@pytest.mark.parametrize("other_len", [0, 40, 144])
def test_indexer_ties_go_to_the_lowest_ids_whatever_shares_the_step(other_len):
    """Scores tie exactly where relu zeroes every head. The picks are the lowest tied ids, and they
    do not move when a longer sequence in the same step widens the score rows (a request's tokens
    must not depend on what else shares its step)."""
    d, ratio = 2, 4
    pool = torch.zeros(2, 64, d, dtype=D64)
    pool[0, :, 0] = torch.arange(1, 65, dtype=D64)  # slot 0 (block 0): keys (s + 1, 0)
    pool[1, :, 0] = 1.0  # slot 1 (block 1): another sequence's keys
    pool[0, 5, 1] = 3.0  # entry 5 is the only one the second head scores above 0
    table = torch.tensor([[0], [1]], dtype=torch.int32)
    q = torch.tensor([[[-1.0, 0.0], [0.0, 1.0]]], dtype=D64)  # head 0 sees -(s + 1) -> relu 0; head 1 sees entry 5
    w = torch.ones(1, 2, dtype=D64)
    positions, slots = [27], [0]  # 7 visible entries: 0..6; entry 5 scores 3, the rest tie at 0
    if other_len:
        positions.append(other_len - 1)
        slots.append(1)
    n = len(positions)
    got = ops.indexer_topk(q.expand(n, 2, d).contiguous(), w.expand(n, 2).contiguous(), pool, table,
                           torch.tensor(slots), torch.tensor(positions), ratio, topk=4)
    assert got[0].tolist() == [5, 0, 1, 2]


def test_moe_gate_ties_go_to_the_lowest_expert():
    x = torch.zeros(1, 2, dtype=D64)  # every expert scores sqrt(softplus(0)): all tie
    weight = torch.randn(16, 2, dtype=D64)
    _, ids = ops.moe_gate(x, weight, torch.zeros(16, dtype=D64), None, None, topk=3, route_scale=1.0)
    assert ids[0].tolist() == [0, 1, 2]


# ---------------------------------------------------------------- MoE
def test_moe_gate_sqrt_softplus_bias_only_selects():
    x = torch.tensor([[1.0, 0.0]], dtype=D64)
    weight = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.5, 0.0]], dtype=D64)
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0], dtype=D64)
    g, ids = ops.moe_gate(x, weight, bias, None, None, topk=2, route_scale=1.5)
    s = [math.sqrt(math.log1p(math.exp(v))) for v in (2.0, 1.0, -1.0, 0.5)]
    assert sorted(ids[0].tolist()) == [0, 2]  # the bias pulls expert 2 in
    exp = {0: s[0] / (s[0] + s[2]) * 1.5, 2: s[2] / (s[0] + s[2]) * 1.5}
    for k, e in enumerate(ids[0].tolist()):
        assert g[0, k].item() == pytest.approx(exp[e], rel=1e-12)


def test_moe_gate_hash_routing_uses_the_token_table():
    x = torch.randn(2, 3, dtype=D64)
    weight = torch.randn(4, 3, dtype=D64)
    tid2eid = torch.tensor([[3, 1], [0, 2], [1, 0]])
    g, ids = ops.moe_gate(x, weight, None, tid2eid, torch.tensor([2, 0]), 2, 1.0)
    assert ids.tolist() == [[1, 0], [3, 1]]
    torch.testing.assert_close(g.sum(-1), torch.ones(2, dtype=D64))


def test_moe_experts_clamped_swiglu_weight_before_w2():
    x = torch.tensor([[3.0, 1.0]], dtype=D64)
    w1 = torch.tensor([[[10.0, 0.0], [0.0, -1.0]]], dtype=D64)  # h1 = [30, -1] -> clamp max 10 -> [10, -1]
    w3 = torch.tensor([[[-5.0, 0.0], [1.0, 1.0]]], dtype=D64)  # h3 = [-15, 4] -> clamp +-10 -> [-10, 4]
    w2 = torch.tensor([[[1.0, 2.0], [0.0, 1.0]]], dtype=D64)
    silu = lambda v: v / (1 + math.exp(-v))  # noqa: E731
    g = 0.7
    a = torch.tensor([silu(10.0) * -10.0 * g, silu(-1.0) * 4.0 * g], dtype=D64)
    expect = w2[0] @ a
    w13 = torch.cat([w1, w3], dim=1)
    out = ops.moe_experts(x, torch.tensor([[0]], dtype=torch.int32), torch.tensor([[g]], dtype=D64),
                          w13, w2, None, limit=10.0)
    torch.testing.assert_close(out[0], expect)
    # shared expert: same clamp, no routing weight
    out2 = ops.moe_experts(x, torch.tensor([[0]], dtype=torch.int32), torch.tensor([[0.0]], dtype=D64),
                           w13, w2, (w13[0], w2[0]), limit=10.0)
    torch.testing.assert_close(out2[0], expect / g)


def test_moe_experts_sum_over_picks_of_several_tokens():
    g = torch.Generator().manual_seed(0)
    T, k, E, D, inter = 5, 2, 3, 4, 3
    x = torch.randn(T, D, generator=g, dtype=D64)
    w13, w2 = torch.randn(E, 2 * inter, D, generator=g, dtype=D64), torch.randn(E, D, inter, generator=g, dtype=D64)
    ids = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]], dtype=torch.int32)
    wts = torch.rand(T, k, generator=g, dtype=D64)
    out = ops.moe_experts(x, ids, wts, w13, w2, None, limit=1.5)
    for t in range(T):
        ref = torch.zeros(D, dtype=D64)
        for j in range(k):
            e = int(ids[t, j])
            h1, h3 = w13[e, :inter] @ x[t], w13[e, inter:] @ x[t]
            ref += w2[e] @ (torch.nn.functional.silu(h1.clamp(max=1.5)) * h3.clamp(-1.5, 1.5) * wts[t, j])
        torch.testing.assert_close(out[t], ref)


def test_grouped_out_proj_is_block_diagonal_then_dense():
    T, G, per, R, Dm = 2, 2, 3, 2, 4
    o = torch.randn(T, G * per, dtype=D64)
    wo_a = torch.randn(G * R, per, dtype=D64)
    wo_b = torch.randn(Dm, G * R, dtype=D64)
    z = torch.cat([o[:, :per] @ wo_a[:R].t(), o[:, per:] @ wo_a[R:].t()], -1)
    torch.testing.assert_close(ops.grouped_out_proj(o, wo_a, wo_b, G), z @ wo_b.t())


@pytest.mark.parametrize("T,E,k", [(1, 16, 2), (5, 16, 2), (16, 8, 3), (40, 4, 2)])
@pytest.mark.parametrize("act_quant", [False, True])
def test_moe_experts_grouped_form_equals_one_expert_at_a_time(T, E, k, act_quant, monkeypatch):
    """The grouped form (padded [E, width, .] buffers, idle experts left out) against the plain loop
    over experts, on random routing that leaves some experts idle and loads others unevenly."""
    g = torch.Generator().manual_seed(T * 100 + E)
    D, inter = 16, 8
    x = torch.randn(T, D, generator=g, dtype=D64)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    ids[: T // 2, 0] = 0  # expert 0 busier than the rest
    w = torch.rand(T, k, generator=g, dtype=D64)
    w13, w2 = torch.randn(E, 2 * inter, D, generator=g, dtype=D64), torch.randn(E, D, inter, generator=g, dtype=D64)
    shared = (torch.randn(2 * inter, D, generator=g, dtype=D64), torch.randn(D, inter, generator=g, dtype=D64))
    monkeypatch.setattr(ReferenceOps, "GROUPED_MOE_BUSY", 0.0)
    grouped = ops.moe_experts(x, ids, w, w13, w2, shared, 10.0, act_quant)
    monkeypatch.setattr(ReferenceOps, "GROUPED_MOE_ELEMENTS", 0)
    looped = ops.moe_experts(x, ids, w, w13, w2, shared, 10.0, act_quant)
    torch.testing.assert_close(grouped, looped, rtol=1e-12, atol=1e-12)


def _attention_by_the_formula(q, wkv, widx, ckv, cidx, sink, scale):
    """o_h = sum_s e^{l_hs} v_s / (sum_s e^{l_hs} + e^{sink_h}), one query at a time."""
    out = torch.zeros_like(q)
    for t in range(q.shape[0]):
        rows = [wkv[i] for i in widx[t].tolist() if i >= 0] + [ckv[i] for i in cidx[t].tolist() if i >= 0]
        if not rows:
            continue
        k = torch.stack(rows)  # [K, d]
        logits = scale * q[t] @ k.t()  # [H, K]
        w = torch.exp(logits)
        out[t] = (w @ k) / (w.sum(-1, keepdim=True) + torch.exp(sink)[:, None])
    return out


# mixed: the first chunk of 64 queries is mostly decode tokens (gathered), the last 6 a prompt's (union)
@pytest.mark.parametrize("layout,union", [("prompt", True), ("decode", False), ("mixed", True)])
def test_attention_gathered_and_union_forms_follow_the_formula(layout, union, monkeypatch):
    """A prompt's queries name overlapping rows (the union form scores them once); decode tokens of
    different sequences name disjoint rows (the gathered form); both against the formula."""
    g = torch.Generator().manual_seed({"prompt": 1, "decode": 2, "mixed": 3}[layout])
    T, H, d, W, Nw, Nc = 70, 3, 8, 48, 4000, 50
    q = torch.randn(T, H, d, generator=g, dtype=D64)
    wkv, ckv = torch.randn(Nw, d, generator=g, dtype=D64), torch.randn(Nc, d, generator=g, dtype=D64)
    sink = torch.randn(H, generator=g, dtype=D64)
    t = torch.arange(T)[:, None]
    if layout == "prompt":  # one sequence: query t sees rows t-W+1 .. t, and the entries closed before it
        widx = t - torch.arange(W)[None, :]
        cidx = torch.where(torch.arange(4)[None, :] < (t + 1) // 16, torch.arange(4)[None, :], -1)
    else:  # decode: one token per sequence, each with its own W rows and picks; mixed: half of them a prompt
        widx = t * W + torch.arange(W)[None, :]
        if layout == "mixed":
            widx = torch.where(t < T // 2, widx, 3900 + t - torch.arange(W)[None, :])
        cidx = torch.stack([torch.randperm(Nc, generator=g)[:4] for _ in range(T)])
        cidx[::5, 2:] = -1
    widx, cidx = widx.masked_fill(widx < 0, -1).to(torch.int32), cidx.to(torch.int32)
    einsums = []
    real = torch.einsum
    monkeypatch.setattr(torch, "einsum", lambda *a: einsums.append(a[0]) or real(*a))
    got = ops.attention(q, wkv, widx, ckv, cidx, sink, 0.3)
    assert bool(einsums) == union  # which form ran
    torch.testing.assert_close(
        got, _attention_by_the_formula(q, wkv, widx, ckv, cidx, sink, 0.3), rtol=1e-12, atol=1e-12
    )


def test_attention_counts_a_row_named_twice_twice():
    """Both forms keep the gathered semantics: each named row is one term, repeats included."""
    q = torch.tensor([[[1.0, 0.0]]], dtype=D64)
    kv = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=D64)
    idx = torch.tensor([[0, 0, 1]], dtype=torch.int32)
    sink = torch.tensor([0.0], dtype=D64)
    got = ops.attention(q, kv, idx, None, None, sink, 1.0)
    e2, e0 = math.exp(2.0), 1.0  # logits: row 0 -> 2 (twice), row 1 -> 0, sink -> 0
    want = (2 * e2 * kv[0] + e0 * kv[1]) / (2 * e2 + e0 + 1.0)
    torch.testing.assert_close(got[0, 0], want, rtol=1e-12, atol=1e-12)


def test_attention_chunks_keep_a_prompts_run_apart_from_decode_tokens():
    """Three decode tokens (each its own ring rows), then a 20-token prompt whose windows slide by one,
    then one more decode token: the prompt's run is chunked on its own; decode tokens gather together."""
    from backends.reference.ops import _chunks

    W = 4
    decode = [[100 + 10 * b + j for j in range(W)] for b in range(3)]
    prompt = [[200 + t - j if t - j >= 0 else -1 for j in range(W)] for t in range(20)]
    idx = torch.tensor(decode + prompt + [[900, 901, 902, 903]], dtype=torch.int32)
    assert _chunks(idx, chunk=8) == [(0, 3, False), (3, 11, True), (11, 19, True), (19, 23, True), (23, 24, False)]
