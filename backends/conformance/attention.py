"""Conformance cases of sparse attention (attention).

Inputs (q, window_kv, window_idx, comp_kv, comp_idx, sink, scale) come from the model's own step
layouts (`layer_inputs`: `v4.cache.window_rows`, `visible_entry_rows`, `entry_rows` over a packed
`StepBatch`), so every backend sees the index lists the model hands it: -1 before position 0, ring
windows just closed or wrapped, empty / smaller-than-top-k compressed lists, paged pools.

`extra`: "blocks" = the kernels' block sizes off a GPU (interpreter-friendly), per backend; the
checks a case asks for beyond the error bound: "zero_rows" (rows that see only the sink: o = 0),
"silent_head" (a head whose sink dwarfs its logits: o ~ 0), "same_without_comp" (a zero-width
compressed list gives the sliding-only result bit for bit), "output_rounding_only" (fp32 kv under
16-bit queries: the only error is the output's rounding).
"""

from __future__ import annotations

import torch

from v4.batch import StepBatch

from .case import BF16, F32, LENGTHS, Case
from .inputs import gen, layer_inputs, qs

F64, F16 = torch.float64, torch.float16
CPU = torch.device("cpu")


def _seed(g: torch.Generator) -> int:
    """A seed for the shared builders, drawn from the case's generator (parity ops' --seed varies it)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=g))


def _tagged(q, wkv, widx, ckv, cidx, sink, scale, kv_role="D") -> list:
    """The op's arguments with their roles; kv_role "acc" keeps the kv rows in float32 under any q dtype."""
    return [("D", q), (kv_role, wkv), ("raw", widx), (kv_role, ckv), ("raw", cidx), ("acc", sink), ("raw", scale)]


def _layer_case(name, batch_of, ring_slots, kind, d, heads, dtypes=(F32, BF16), kv_role="D", extra=None,
                expect=None, **layer):
    """A Case over one step batch: its layer's window / compressed lists (`layer_inputs`) and queries.
    `expect(widx, cidx)` asserts that the lists hold the scenario the case is named for."""
    def build(g, mode):
        batch = batch_of()
        wkv, widx, ckv, cidx = layer_inputs(batch, ring_slots, kind, d, F64, seed=_seed(g), **layer)
        if expect is not None:
            expect(widx, cidx)
        q, sink = qs(batch.num_tokens, heads, d, F64, seed=_seed(g))
        return _tagged(q, wkv, widx, ckv, cidx, sink.double(), d**-0.5, kv_role), {}

    return Case("attention", name, build, dtypes=dtypes, extra={"blocks": {}, **(extra or {})})


def _prefill_cases():
    """One sequence prefilled from position 0 at the boundary token counts: window rows before 0 are
    -1. HCA (entries j < (t+1)//4, none at all for T < 4: comp_idx with Kc = 0) at head dims 128 and
    32 (bf16 at d = 32 skips 127 and 128: the boundaries do not depend on the dtype, the interpreter
    pays ~3 s per long prefill); CSA picks scattered among -1 (rows t < 3 see no entry: all -1) and
    sliding-only (comp None) once each, in fp32."""
    for T in LENGTHS:
        # long prefills: one 128-index chunk per list where the tiles allow it (the interpreter pays per
        # chunk); Ascend's Unified Buffer holds a 128-row chunk up to d = 64
        long = {"block_k": 128} if T > 100 else {}
        heads = 8 if T < 100 else 4

        def prefill(T=T):
            return StepBatch([0], [0], [T], CPU)

        def expect(widx, cidx, T=T):
            assert (widx < 0).any()  # the window still filling
            assert cidx is None or (T >= 4) == bool((cidx >= 0).any())  # an entry from T = 4 on

        for d, kind, dtypes in ((128, "hca", (F32, BF16)), (32, "hca", (F32, BF16) if T not in (127, 128) else (F32,)),
                                (128, "csa", (F32,)), (32, "sliding", (F32,))):
            blocks = {"cuda": long, "ascend": long if d <= 64 else {}}
            yield _layer_case(f"prefill T={T},d={d},{kind}", prefill, 1, kind, d, heads, dtypes,
                              extra={"blocks": blocks}, expect=expect, topk=16, scatter=True)


def _decode_cases():
    """Decode and packed batches: several sequences in one step at different positions, ring windows
    (just closed, wrapped), every compressed-list form (none, Kc = 0, HCA, CSA picks scattered among -1
    and top-k wider than what is visible), paged pools, V4's head dim 512."""
    # positions 127 (window just full: no -1), 128 and 300 (ring wrapped), 5 (window mostly -1, top-k
    # larger than the 1 visible entry), 2 (no entry: an all -1 compressed row)
    def expect(widx, cidx):
        assert (widx[:3] >= 0).all() and (widx[3:] < 0).any()
        assert (cidx[4] < 0).all() and (cidx[3] >= 0).sum() == 1

    yield _layer_case("decode 5 sequences,csa top-k 64 > visible", lambda: StepBatch(
        [0, 1, 2, 3, 4], [127, 128, 300, 5, 2], [1] * 5, CPU), 5, "csa", 64, 8, expect=expect, topk=64)
    # a prefill from 0, a decode step, a prefill chunk continuing at 7, a long decode; fp16 here too
    mixed = lambda: StepBatch([2, 0, 3, 1], [0, 130, 7, 517], [6, 1, 5, 1], CPU)  # noqa: E731
    yield _layer_case("mixed batch,hca", mixed, 4, "hca", 64, 8, (F32, BF16, F16))
    yield _layer_case("mixed batch,csa scattered", mixed, 4, "csa", 64, 8, topk=24, scatter=True)
    sliding = lambda: StepBatch([0, 1], [0, 200], [4, 1], CPU)  # noqa: E731
    yield _layer_case("sliding only,comp None", sliding, 2, "sliding", 64, 8)
    yield _layer_case("sliding,Kc = 0", sliding, 2, "sliding0", 64, 8, extra={"same_without_comp": True})
    yield _layer_case("d=512,csa scattered", lambda: StepBatch([0], [130], [2], CPU), 1, "csa", 512, 16,
                      topk=40, scatter=True)
    yield _layer_case("bf16 q over fp32 kv,hca", lambda: StepBatch([0, 1], [0, 40], [2, 1], CPU), 2, "hca", 64, 8,
                      (BF16,), kv_role="acc", extra={"output_rounding_only": True})
    yield Case("attention", "all -1 rows,large logits", _all_minus_one_rows,
               extra={"blocks": {"cuda": {"block_k": 16}, "ascend": {"block_k": 16}}, "zero_rows": [2]})
    yield Case("attention", "H=20,one sink dominates", _sink_dominates, dtypes=(F32,),
               extra={"blocks": {"ascend": {"block_h": 16}}, "silent_head": 3})


def _all_minus_one_rows(g, mode):
    """Random lists with -1 interspersed, Kw = 77 and Kc = 37 (no block size's multiple): row 2 all -1
    in both lists (sees only the sink), row 4 window only, row 5 compressed only, row 1 whole chunks
    of -1 before valid ones, row 3 -1 tail padding. Scale 1: logits ~ +-30, so the running max is
    rescaled many times."""
    T, H, d = 6, 8, 64
    _, r = gen(_seed(g))
    wkv, ckv = r(50, d, dtype=F64), r(40, d, dtype=F64)
    widx = torch.randint(-1, 50, (T, 77), generator=g, dtype=torch.int32)
    cidx = torch.randint(-1, 40, (T, 37), generator=g, dtype=torch.int32)
    widx[2], cidx[2] = -1, -1
    cidx[4] = -1
    widx[5] = -1
    widx[1, :40] = -1
    widx[3, 20:] = -1
    q, sink = qs(T, H, d, F64, seed=_seed(g))
    return _tagged(q, wkv, widx, ckv, cidx, sink.double(), 1.0), {}


def _sink_dominates(g, mode):
    """H = 20: not a multiple of any head block (the last one is partly masked); head 3's sink far
    above its logits, so its output is ~0."""
    T, H, d = 3, 20, 32
    _, r = gen(_seed(g))
    wkv = r(30, d, dtype=F64)
    widx = torch.randint(-1, 30, (T, 40), generator=g, dtype=torch.int32)
    q, sink = qs(T, H, d, F64, seed=_seed(g))
    sink[3] = 60.0
    return _tagged(q, wkv, widx, None, None, sink.double(), d**-0.5), {}


CASES = {"attention": [*_prefill_cases(), *_decode_cases()]}
