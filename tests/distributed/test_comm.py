"""The communicator over torch.distributed, on gloo with two CPU processes.

- HCCL's rule (no processes): all-gather / reduce-scatter into one tensor is refused at 3, 5, 6
  and 7 ranks, with a sentence, and checked for the layout at start-up;
- `ep_all_to_all` with uneven splits moves exactly the rows a hand-built table says;
- the Ascend backend's MC2-shaped dispatch / combine (emulated: gloo, CPU) against expectations
  written out by hand;
- the expert-parallel MoE over the emulated Ascend ops against the single-process
  `ops.moe_experts` on the same inputs: through MC2's shape (<= 512 tokens per rank), through the
  all-to-all fallback above it, and through the all-gather path.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed.dist_util import GROUP_TIMEOUT_S, spawn
from v4.config import load_config_file
from v4.dist.comm import HCCL_NO_GATHER_SIZES, Communicator, check_gather_size, check_layout, process_group_backend
from v4.dist.parallel import ParallelConfig
from v4.errors import ConfigError


def _comm(rank: int, tp: int, dp: int, cls=Communicator):
    cfg, _ = load_config_file("tiny")  # 4 heads, 2 o_groups, 8 experts: TP2 or DP2 with EP2
    return cls(ParallelConfig(tp, dp, True).rank(cfg, rank), "gloo", GROUP_TIMEOUT_S)


# ---------------------------------------------------------------------------------- HCCL's rule
def test_hccl_refuses_gather_at_3_5_6_7_ranks_and_only_hccl():
    for n in range(1, 9):
        for backend in ("hccl", "gloo", "nccl"):
            refused = backend == "hccl" and n in (3, 5, 6, 7)
            if refused:
                with pytest.raises(ConfigError, match=f"HCCL cannot all-gather or reduce-scatter into one tensor "
                                                      f"across {n} ranks.*other than 3, 5, 6 or 7"):
                    check_gather_size(backend, n)
            else:
                check_gather_size(backend, n)
    assert HCCL_NO_GATHER_SIZES == (3, 5, 6, 7)


def test_start_up_check_refuses_only_the_all_gather_moe_path_under_hccl():
    for tp, dp in ((3, 1), (1, 5), (3, 2), (7, 1), (2, 1), (2, 2), (4, 2), (1, 8)):
        ep_size = tp * dp
        for backend in ("hccl", "gloo", "nccl"):
            # alltoall, and no expert parallel at all, never gather into one tensor: always allowed
            check_layout(backend, ParallelConfig(tp, dp, True), "alltoall")
            check_layout(backend, ParallelConfig(tp, dp, False), "allgather")
            lay = ParallelConfig(tp, dp, True)
            if backend == "hccl" and ep_size in (3, 5, 6, 7):
                with pytest.raises(ConfigError, match=f"across {ep_size} ranks, which the all-gather MoE path "
                                                      r"\(runtime.moe_comm: allgather\) needs"):
                    check_layout(backend, lay, "allgather")
            else:
                check_layout(backend, lay, "allgather")


# ---------------------------------------------------------------------------------- ep_all_to_all
SENDS = ([[1, 3], [2, 0]], [[0, 0], [2, 5]])  # SEND[src][dst]: rows rank src sends rank dst


def _rows(src: int, dst: int, n: int, dtype) -> torch.Tensor:
    """Row j from src to dst: 16 src + 4 dst + j + (0, .25, .5, .75): exact in bf16, unique per row."""
    base = 16 * src + 4 * dst + torch.arange(n, dtype=torch.float64)[:, None]
    return (base + 0.25 * torch.arange(4, dtype=torch.float64)).to(dtype)


def _all_to_all_ranks(rank, world):
    comm = _comm(rank, 1, 2)
    for send in SENDS:
        recv = [send[s][rank] for s in range(world)]
        assert comm.ep_exchange_counts(torch.tensor(send[rank])).tolist() == recv
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            x = torch.cat([_rows(rank, d, send[rank][d], dtype) for d in range(world)])
            got = comm.ep_all_to_all(x, send[rank], recv)
            want = torch.cat([_rows(s, rank, send[s][rank], dtype) for s in range(world)])
            assert got.dtype == dtype and torch.equal(got, want), (send, dtype, got, want)
    return True


def test_ep_all_to_all_moves_uneven_rows():
    assert spawn(_all_to_all_ranks, 2) == [True, True]


# ---------------------------------------------------------------------------------- MC2 shape, emulated
E, D = 8, 16


def _routed(src: int, t: int, k: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * seed + src)
    x = torch.randn(t, D, generator=g).to(dtype)
    ids = torch.rand(t, E, generator=g).argsort(1)[:, :k].to(torch.int32)  # k distinct experts per token
    return x, ids, torch.rand(t, k, generator=g)


def _dispatch_ranks(rank, world):
    from backends.ascend.comm import AscendCommunicator

    comm = _comm(rank, 1, 2, AscendCommunicator)
    assert comm.emulated
    per = E // world
    for seed, tokens, k, dtype in ((1, (5, 7), 3, torch.float32), (2, (6, 0), 2, torch.float32),
                                   (3, (4, 9), 2, torch.bfloat16), (4, (0, 0), 2, torch.float32)):
        inputs = [_routed(s, tokens[s], k, seed, dtype) for s in range(world)]
        x, ids, w = inputs[rank]
        d = comm.moe_distribute_dispatch(x, ids, E, expert_scales=w)
        # by hand: for each local expert in order, each source rank in order, its pairs in token order
        rows, scales, nums = [], [], []
        for e in range(rank * per, (rank + 1) * per):
            n = 0
            for xs, idss, ws in inputs:
                for t in range(xs.shape[0]):
                    for j in range(k):
                        if int(idss[t, j]) == e:
                            rows.append(xs[t])
                            scales.append(ws[t, j])
                            n += 1
            nums.append(n)
        want = torch.stack(rows) if rows else x.new_zeros(0, D)
        assert d.expand_x.dtype == dtype and torch.equal(d.expand_x, want)
        assert torch.equal(d.expand_scales, torch.stack(scales) if scales else torch.zeros(0))
        assert d.expert_token_nums.tolist() == nums
        assert d.ep_recv_counts.tolist() == [int((idss.long() // per == rank).sum()) for _, idss, _ in inputs]
        # an identity "expert", then the combine: sum over k of weight * x, per token
        y = comm.moe_distribute_combine(d.expand_x.float(), d.assist_info_for_combine, d.ep_recv_counts, w)
        direct = (w.double().unsqueeze(2) * x.double().unsqueeze(1)).sum(1)
        assert y.dtype == torch.float32 and y.shape == (x.shape[0], D)
        torch.testing.assert_close(y.double(), direct, rtol=1e-6, atol=1e-6)
    return True


def test_ascend_emulated_dispatch_and_combine_follow_mc2_shapes():
    assert spawn(_dispatch_ranks, 2) == [True, True]


# ---------------------------------------------------------------------------------- EP MoE vs one process
LIMIT = 10.0
TID2EID_ROWS = 50


def _experts(seed: int, inter: int = 32):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.2)  # noqa: E731
    w1s, w3s, w2s = [mk(inter, D) for _ in range(E)], [mk(inter, D) for _ in range(E)], [mk(D, inter) for _ in range(E)]
    return w1s, w3s, w2s, ([mk(inter, D)], [mk(inter, D)], [mk(D, inter)])


def _inputs(routing: str, src: int, t: int, step: int):
    """x [t, D], ids [t, k], weights [t, k]: top-k (3 of 8, from scores) or hash (2 fixed ids per token id)."""
    g = torch.Generator().manual_seed(100 * step + src)
    x = torch.randn(t, D, generator=g) * 2
    if routing == "topk":
        ids = torch.rand(t, E, generator=g).argsort(1)[:, :3]
    else:  # a fixed token-id -> experts table, as the hash-routed layers have; some rows pile on expert 0-1
        table = torch.rand(TID2EID_ROWS, E, generator=torch.Generator().manual_seed(7)).argsort(1)[:, :2]
        table[:10] = torch.tensor([0, 1])
        ids = table[torch.randint(0, TID2EID_ROWS, (t,), generator=g)]
    return x, ids.to(torch.int32), torch.rand(ids.shape, generator=g)


class _Counting:
    """Counts which exchange the MoE took (a mixin over the Ascend communicator)."""

    def moe_distribute_dispatch(self, *a, **kw):
        self.taken.append("mc2")
        return super().moe_distribute_dispatch(*a, **kw)

    def ep_exchange_counts(self, send):
        self.taken.append("alltoall")
        return super().ep_exchange_counts(send)

    def ep_all_gather(self, x):
        self.taken.append("allgather")
        return super().ep_all_gather(x)


def _ep_moe_ranks(rank, world, tp, dp, routing, steps):
    os.environ["DSV4_ASCEND_EMULATE"] = "1"
    import backends
    from backends.ascend.comm import AscendCommunicator
    from v4.dist.moe import ExpertParallelMoE

    ops = backends.get_ops("ascend")
    assert ops.emulated and ops.communicator_class is AscendCommunicator
    assert process_group_backend(ops.device) == "gloo"  # HCCL only for npu:N
    comm = _comm(rank, tp, dp, type("CountingAscendCommunicator", (_Counting, AscendCommunicator), {}))
    comm.taken = []
    e0, e1 = comm.place.experts
    w1s, w3s, w2s, (s1, s3, s2) = _experts(5)
    full = ops.prepare_experts(w1s, w3s, w2s, torch.float32)
    mine = ops.prepare_experts(w1s[e0:e1], w3s[e0:e1], w2s[e0:e1], torch.float32)
    s13, s2g = ops.prepare_experts(s1, s3, s2, torch.float32)
    shared = (s13[0], s2g[0])
    worst = 0.0
    for method in ("alltoall", "allgather"):
        moe = ExpertParallelMoE(ops, comm, comm.place, E, method)
        for step, tokens in enumerate(steps):
            # DP: each rank its own tokens; TP: the same tokens on both ranks (each sends its share)
            every = [_inputs(routing, s, tokens[s], step) for s in range(world if dp > 1 else 1)]
            x, ids, w = every[rank if dp > 1 else 0]
            comm.taken.clear()
            if x.shape[0] == 0:
                moe.dummy(x, ids.shape[1], *mine, LIMIT, False)
            else:
                y = moe(x, ids, w, *mine, shared, LIMIT, False)
                want = ops.moe_experts(x, ids, w, *full, shared, LIMIT)
                assert y.dtype == want.dtype == torch.float32
                torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
                worst = max(worst, float(((y - want).abs() / want.abs().clamp(min=1)).max()))
            share = max(tokens) if dp > 1 else -(-tokens[0] // tp)
            path = method if method == "allgather" or share > 512 else "mc2"
            assert comm.taken[:1] == [path], (method, tokens, comm.taken)
            if path == "mc2" and x.shape[0]:
                # one process over every rank's tokens puts the same rows in each expert's group, and
                # the combine adds a token's pairs in ascending expert id, as moe_experts does: same bits
                all_x, all_ids, all_w = (torch.cat([p[i] for p in every]) for i in range(3))
                o = sum(tokens[:rank]) if dp > 1 else 0
                assert torch.equal(y, ops.moe_experts(all_x, all_ids, all_w, *full, shared, LIMIT)[o:o + x.shape[0]])
    return worst


@pytest.mark.parametrize("tp,dp,routing,steps", [
    (1, 2, "topk", [(9, 4), (600, 3), (5, 0), (0, 700)]),  # DP2 + EP2: uneven, over the limit, a dummy rank
    (2, 1, "hash", [(13, 13), (1030, 1030)]),  # TP2 + EP2: 7 + 6 tokens per rank, then 515 (over the limit)
], ids=["dp2-topk", "tp2-hash"])
def test_ep_moe_on_emulated_ascend_equals_one_process(tp, dp, routing, steps):
    # measured: at most 7.6e-7 of max(1, |y|) (one-process expert groups hold fewer rows when the
    # DP ranks' tokens differ, and the CPU matmul's rounding depends on the row count)
    assert max(spawn(_ep_moe_ranks, 2, tp, dp, routing, steps)) < 1e-6
