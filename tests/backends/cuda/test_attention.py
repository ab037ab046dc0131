"""CUDA-backend sparse MQA attention (backends/cuda/kernels/attention.py): what is CUDA's own.

The prefills at the boundary token counts and the decode / packed batches (ring windows, every
compressed-list form, paged pools, d = 512, fp16, bf16 q over fp32 kv, all -1 rows, a dominating
sink) run over every backend in tests/conformance/test_attention.py. Here: FP8 KV rows (packing,
every e4m3 code, the fp8 kernel), split-KV (flash-decoding) and its launch choices, rejections.

Without a GPU the Triton kernel runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1,
set here before triton is imported); with one it runs on it. Ground truth: ReferenceOps("cpu")
.attention in fp64 on the same (already rounded) inputs, index lists from the model's own
step-layout helpers (`layer_inputs`).
"""

from functools import partial

import pytest
import torch

from backends.cuda.kernels import attention as K
from backends.conformance import ATTENTION_TOL, attention_truth, check_rel, gen, layer_inputs, qs, run_attention
from v4 import quant
from v4.model import StepBatch

GPU = torch.cuda.is_available()

pytestmark = pytest.mark.gpu  # bench/gpu_check.sh runs these natively on a GPU

DEV = "cuda" if GPU else "cpu"
D64 = torch.float64
BF16 = torch.bfloat16
# max |out - truth| / max |truth| (the conformance cases' rule for this kernel family)
TOL = ATTENTION_TOL["cuda"]


def dev(t):
    return None if t is None else t.to(DEV)


check = partial(check_rel, tol=TOL)
# run(q, wkv, widx, ckv, cidx, sink, scale, what, **blocks): K.attention on DEV against fp64 truth
run = partial(run_attention, K.attention, TOL, to_device=dev)


# ---------------------------------------------------------------- rejections


def test_rejects_non_power_of_two_head_dim():
    q = torch.zeros(1, 2, 96, device=DEV)
    with pytest.raises(AssertionError, match="power of two"):
        K.attention(q, torch.zeros(4, 96, device=DEV), torch.zeros(1, 4, dtype=torch.int32, device=DEV),
                    None, None, torch.zeros(2, device=DEV), 1.0)


# ---------------------------------------------------------------- FP8 KV rows


def test_row_bytes():
    assert K.row_bytes(512) == 584  # 448 e4m3 + 64 bf16 + 7 ue8m0 + 1 pad (spec §3.3)
    assert K.row_bytes(128) == 200  # 64 e4m3 + 64 bf16 + 1 ue8m0 + 7 pad


def awkward_kv(N, d, seed, dtype=torch.float32):
    """Rows whose 64-dim blocks span many magnitudes: zero blocks (amax floor), tiny values (e4m3
    subnormals), blocks whose amax is exactly 448 * 2^k, large values."""
    g, r = gen(seed)
    kv = r(N, d)
    nb = d // 64
    kv = (kv.view(N, nb, 64) * torch.exp2(torch.randint(-24, 20, (N, nb, 1), generator=g).float())).view(N, d)
    kv[0, :64] = 0.0
    kv[1, :64] = 1e-9 * r(64)
    kv[2, :64] = kv[2, :64] / kv[2, :64].abs().max() * 448 * 2.0**-3
    return kv.to(dtype)


@pytest.mark.parametrize("d", [128, 512])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_pack_unpack_matches_kv_fake_quant(d, dtype):
    kv = awkward_kv(9, d, seed=d, dtype=dtype)
    packed = K.pack_fp8_kv(dev(kv))
    nope, nsc = d - 64, (d - 64) // 64
    assert packed.dtype == torch.uint8 and packed.shape == (9, K.row_bytes(d))
    back = K.unpack_fp8_kv(packed, d).cpu()
    assert back.dtype == torch.float32
    fq = quant.kv_fake_quant_fp8(kv, 64).float()
    assert torch.equal(back[:, :nope], fq[:, :nope])  # nope dims: exactly the exact-mode fake quant
    assert torch.equal(back[:, nope:], kv[:, nope:].to(BF16).float())  # rope dims: bf16
    # byte layout: e4m3 | bf16 rope | ue8m0 scales | zero pad
    p = packed.cpu()
    s = quant.pow2_scale(kv[:, :nope].float().view(9, nsc, 64).abs().amax(-1), quant.FP8_MAX, quant.FP8_AMAX_FLOOR)
    assert torch.equal(p[:, nope + 128: nope + 128 + nsc], quant.ue8m0_encode(s).view(torch.uint8))
    assert (p[:, nope + 128 + nsc:] == 0).all()
    assert torch.equal(p[:, nope: nope + 128].contiguous().view(BF16), kv[:, nope:].to(BF16))


@pytest.mark.parametrize("native", [False, True])
def test_fp8_decode_every_code(native):
    # every e4m3 byte except the NaN codes 0x7f / 0xff, with random scales and rope dims: with one
    # index per query and sink = -inf the output is the dequantised row itself, bit for bit
    d, g = 128, torch.Generator().manual_seed(61)
    codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)] + [0, 0], dtype=torch.uint8)
    N = codes.numel() // 64
    packed = torch.zeros(N, K.row_bytes(d), dtype=torch.uint8)
    packed[:, :64] = codes.view(N, 64)
    packed[:, 64:192] = torch.randn(N, 64, generator=g).to(BF16).view(torch.uint8)
    packed[:, 192] = torch.randint(100, 150, (N,), generator=g).to(torch.uint8)
    idx = torch.arange(N, dtype=torch.int32).view(N, 1)
    q = torch.zeros(N, 1, d)
    sink = torch.full((1,), float("-inf"))
    out = K.attention_fp8kv(dev(q), dev(packed), dev(idx), None, None, dev(sink), 1.0, d, native_fp8=native)
    assert torch.equal(out[:, 0].cpu(), K.unpack_fp8_kv(packed, d))


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("native", [False, True])
def test_attention_fp8kv_matches_reference_on_unpacked(dtype, native):
    batch = StepBatch([1, 0, 2], [0, 140, 9], [4, 1, 2], torch.device("cpu"))
    wkv, widx, ckv, cidx = layer_inputs(batch, 3, "csa", 128, torch.float32, seed=71, topk=20, scatter=True)
    wp, cp = K.pack_fp8_kv(wkv), K.pack_fp8_kv(ckv)
    q, sink = qs(batch.num_tokens, 8, 128, dtype, seed=73)
    out = K.attention_fp8kv(dev(q), dev(wp), dev(widx), dev(cp), dev(cidx), dev(sink), 128 ** -0.5, 128,
                            native_fp8=native)
    ref = attention_truth(q, K.unpack_fp8_kv(wp, 128), widx, K.unpack_fp8_kv(cp, 128), cidx, sink, 128 ** -0.5)
    check(out, ref, dtype, "fp8 kv")
    # and the same as the bf16/fp32 kernel on the unpacked rows
    plain = K.attention(dev(q), dev(K.unpack_fp8_kv(wp, 128)), dev(widx), dev(K.unpack_fp8_kv(cp, 128)), dev(cidx),
                        dev(sink), 128 ** -0.5)
    check(out, plain.cpu().to(D64), dtype, "fp8 kv vs unpacked")


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_attention_fp8kv_head_dim_512(dtype):
    batch = StepBatch([0], [260], [2], torch.device("cpu"))
    wkv, widx, ckv, cidx = layer_inputs(batch, 1, "hca", 512, torch.float32, seed=81)
    wp, cp = K.pack_fp8_kv(wkv), K.pack_fp8_kv(ckv)
    assert wp.shape[1] == 584
    q, sink = qs(2, 16, 512, dtype, seed=82)
    out = K.attention_fp8kv(dev(q), dev(wp), dev(widx), dev(cp), dev(cidx), dev(sink), 512 ** -0.5, 512)
    ref = attention_truth(q, K.unpack_fp8_kv(wp, 512), widx, K.unpack_fp8_kv(cp, 512), cidx, sink, 512 ** -0.5)
    check(out, ref, dtype, "fp8 kv d=512")


# ---------------------------------------------------------------- split-KV (flash-decoding)


class _Recorder:
    """Stands in for a Triton kernel object: notes each launch grid, then launches (or not)."""

    def __init__(self, name, kernel, log, launch):
        self.name, self.kernel, self.log, self.launch = name, kernel, log, launch

    def __getitem__(self, grid):
        self.log.append((self.name, tuple(grid)))
        return self.kernel[grid] if self.launch else (lambda *args, **kwargs: None)


def record_grids(monkeypatch, launch=True):
    """[(kernel name, grid)] of every attention launch from here on (launch=False: grids only)."""
    log = []
    for name in ("_sink_attention_kernel", "_combine_splits_kernel"):
        monkeypatch.setattr(K, name, _Recorder(name, getattr(K, name), log, launch))
    return log


def n_chunks(widx, cidx, block_k):
    kc = 0 if cidx is None else cidx.shape[1]
    return -(-widx.shape[1] // block_k) + -(-kc // block_k)


# decode batches: window still filling (-1 rows), just closed (127), wrapped (128, 300), long
# (700: 175 HCA entries), no compressed entry yet (2)
DECODE_STARTS = {1: [700], 3: [5, 127, 128], 4: [300, 0, 129, 64], 5: [127, 128, 700, 5, 2]}


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("kind", ["sliding", "hca", "csa"])
@pytest.mark.parametrize("T", [1, 3, 4, 5])
def test_split_kv_decode(T, kind, dtype):
    # forced splits: 1 (single kernel), 2, 3, 7 (ranges over part of the window list, the list
    # boundary, part of the compressed list) and more splits than chunks (empty splits)
    batch = StepBatch(list(range(T)), DECODE_STARTS[T], [1] * T, torch.device("cpu"))
    wkv, widx, ckv, cidx = layer_inputs(batch, T, kind, 64, dtype, seed=90 + T, topk=40, scatter=True)
    q, sink = qs(T, 4, 64, dtype, seed=95 + T)
    chunks = n_chunks(widx, cidx, 32)
    for splits in (1, 2, 3, 7, chunks + 2):
        run(q, wkv, widx, ckv, cidx, sink, 64 ** -0.5, f"{kind} T={T} splits={splits}", block_k=32, splits=splits)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_split_kv_minus_one_ranges(dtype):
    # Kw = 64, Kc = 32, 16-index chunks: 4 window + 2 compressed chunks; 3 splits of 2 chunks:
    # split 1 (window 32..63) holds only -1 for every row. Row 2: all -1 (output exactly 0);
    # row 3: split 0 (the sink's) sees only -1, the others see rows; scale 1: logits ~ +-30
    g, r = gen(97)
    T, H, d = 4, 4, 64
    wkv, ckv = r(60, d).to(dtype), r(30, d).to(dtype)
    widx = torch.randint(0, 60, (T, 64), generator=g, dtype=torch.int32)
    cidx = torch.randint(-1, 30, (T, 32), generator=g, dtype=torch.int32)
    widx[:, 32:] = -1
    widx[2], cidx[2] = -1, -1
    widx[3, :32] = -1
    q, sink = qs(T, H, d, dtype, seed=98)
    for splits in (1, 3, 6, 10):
        out = run(q, wkv, widx, ckv, cidx, sink, 1.0, f"-1 ranges splits={splits}", block_k=16, splits=splits)
        assert (out[2] == 0).all()
        # the old per-chunk branch (skip_empty=True) instead of the default trailing -1 trim + branch-free
        # loop, which folds the inner all -1 chunks in as no-ops: the same answers
        out = run(q, wkv, widx, ckv, cidx, sink, 1.0, f"-1 ranges splits={splits} skip", block_k=16,
                  splits=splits, skip_empty=True, num_stages=2)
        assert (out[2] == 0).all()


def test_split_kv_combine_tiles():
    # the merge's own tiles: H = 20 -> two head tiles (the second one ragged), d = 256 -> two d tiles
    g, r = gen(103)
    T, H, d = 2, 20, 256
    wkv, ckv = r(50, d), r(40, d)
    widx = torch.randint(-1, 50, (T, 45), generator=g, dtype=torch.int32)
    cidx = torch.randint(-1, 40, (T, 21), generator=g, dtype=torch.int32)
    q, sink = qs(T, H, d, torch.float32, seed=104)
    run(q, wkv, widx, ckv, cidx, sink, d ** -0.5, "H=20 d=256 splits=3", splits=3)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_split_kv_fp8(dtype):
    batch = StepBatch([1, 0, 2], [0, 140, 9], [4, 1, 2], torch.device("cpu"))
    wkv, widx, ckv, cidx = layer_inputs(batch, 3, "csa", 128, torch.float32, seed=99, topk=40, scatter=True)
    wp, cp = K.pack_fp8_kv(wkv), K.pack_fp8_kv(ckv)
    q, sink = qs(batch.num_tokens, 4, 128, dtype, seed=100)
    ref = attention_truth(q, K.unpack_fp8_kv(wp, 128), widx, K.unpack_fp8_kv(cp, 128), cidx, sink, 128 ** -0.5)
    chunks = n_chunks(widx, cidx, 32)
    for splits in (1, 3, 7, chunks + 2):
        out = K.attention_fp8kv(dev(q), dev(wp), dev(widx), dev(cp), dev(cidx), dev(sink), 128 ** -0.5, 128,
                                block_k=32, splits=splits)
        check(out, ref, dtype, f"fp8 kv splits={splits}")


def test_split_kv_rejects_bad_splits():
    q = torch.zeros(1, 2, 64, device=DEV)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="splits"):
            K.attention(q, torch.zeros(4, 64, device=DEV), torch.zeros(1, 4, dtype=torch.int32, device=DEV),
                        None, None, torch.zeros(2, device=DEV), 1.0, splits=bad)


def test_auto_splits_decode_vs_prefill(monkeypatch):
    # a 132-SM GPU's target (2 programs per SM); grids only, at V4's shapes (H = 64, d = 512,
    # Kw = 128, Kc = 512 top-k): decode splits the lists, a prefill-sized T fills the GPU alone
    monkeypatch.setattr(K, "target_programs", lambda device: 264)
    grids = record_grids(monkeypatch, launch=False)
    H, d, Kw, Kc = 64, 512, 128, 512
    sink = torch.zeros(H)
    for T in (1, 8, 64, 256):
        del grids[:]
        q = torch.zeros(T, H, d, dtype=BF16)
        kv = torch.zeros(16, d, dtype=BF16)
        widx, cidx = torch.zeros(T, Kw, dtype=torch.int32), torch.zeros(T, Kc, dtype=torch.int32)
        K.attention(q, kv, widx, kv, cidx, sink, d ** -0.5)
        (name, (t, hb, splits)), *combine = grids
        assert name == "_sink_attention_kernel" and (t, hb) == (T, 2)
        if T * hb >= 264:
            assert splits == 1 and not combine, grids
        else:
            assert 1 < splits <= n_chunks(widx, cidx, 32) and t * hb * splits <= 264, grids
            assert [n for n, _ in combine] == ["_combine_splits_kernel"]
        K.attention_fp8kv(q, torch.zeros(16, K.row_bytes(d), dtype=torch.uint8), widx,
                          torch.zeros(16, K.row_bytes(d), dtype=torch.uint8), cidx, sink, d ** -0.5, d)
        assert (grids[-1][1][2] > 1) == (T * 2 < 264)  # fp8: the same decision, in its own chunk sizes


@pytest.mark.parametrize("fp8", [False, True])
def test_split_choice_ignores_index_contents(monkeypatch, fp8):
    # CUDA-graph safety: equal shapes launch equal grids whatever the indices hold (all -1, or
    # all valid), and both results are right
    monkeypatch.setattr(K, "target_programs", lambda device: 64)
    grids = record_grids(monkeypatch)
    batch = StepBatch([0, 1], [300, 40], [1, 1], torch.device("cpu"))
    wkv, widx, ckv, cidx = layer_inputs(batch, 2, "csa", 128, torch.float32, seed=101, topk=32)
    q, sink = qs(2, 4, 128, torch.float32, seed=102)
    if fp8:
        wp, cp = K.pack_fp8_kv(wkv), K.pack_fp8_kv(ckv)
        wkv, ckv = K.unpack_fp8_kv(wp, 128), K.unpack_fp8_kv(cp, 128)
    seen = []
    for w, c in ((widx, cidx), (torch.full_like(widx, -1), torch.full_like(cidx, -1))):
        del grids[:]
        if fp8:
            out = K.attention_fp8kv(dev(q), dev(wp), dev(w), dev(cp), dev(c), dev(sink), 128 ** -0.5, 128)
        else:
            out = K.attention(dev(q), dev(wkv), dev(w), dev(ckv), dev(c), dev(sink), 128 ** -0.5)
        check(out, attention_truth(q, wkv, w, ckv, c, sink, 128 ** -0.5), torch.float32, f"fp8={fp8}")
        seen.append(list(grids))
    assert seen[0] == seen[1] and seen[0][0][1][2] > 1, seen
    assert (out == 0).all()
