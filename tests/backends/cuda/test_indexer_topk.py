"""CUDA-backend lightning indexer: the in-kernel top-k and the graph-safe `max_visible` path.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set here
before triton is imported); with one they run on it.

Ground truth is independent of the kernels: random cases go through the tie-aware comparison with
the reference backend in fp64 (`check_indexer_topk`); "exact" cases use small integer q and keys and power-of-two
weights, so every score is exact in fp32, bf16 products and fp64 alike, ties are real ties, and the
expected picks are fp64 scores sorted by (score descending, id ascending), compared id for id.
"""

import pytest
import torch
import triton
import triton.language as tl

from backends.cuda.kernels import indexer as I
from backends.conformance import check_indexer_topk as _check_topk
from backends.conformance import entry_scores64, gen, indexer_case, random_table
from v4.graphs import GraphCaptureError, HostSyncGuard

pytestmark = pytest.mark.gpu  # bench/gpu_check.sh runs these natively on a GPU

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
RATIO = 4


def dev(*ts):
    return [t.to(DEV) for t in ts]


def _run(case, topk, max_visible=None):
    q, w, pool, table, tok_slot, positions = case
    return I.indexer_topk(*dev(q, w, pool, table, tok_slot, positions), RATIO, topk, max_visible=max_visible).cpu()


def _capacity(case):
    return case[3].shape[1] * case[2].shape[1]


def _expected(scores, nvis, topk):
    """Best first, equal scores lowest id first, -1 padded: from fp64 scores, by a plain sort."""
    out = torch.full((scores.shape[0], topk), -1, dtype=torch.int32)
    for t in range(scores.shape[0]):
        row = scores[t, : int(nvis[t])].tolist()
        picks = sorted(range(len(row)), key=lambda s: (-row[s], s))[:topk]
        out[t, :len(picks)] = torch.tensor(picks, dtype=torch.int32)
    return out


def _exact_case(seed, nvis, *, H=4, d=16, bs=8, slots=2, dtype=F32, positive_w=()):
    """Integer-valued case with many exact ties: scores are sums of w_h * relu(int), all exact.

    Entries 5..24 of each slot are "dead" (q . k < 0 for every head, score exactly 0 whatever the
    weights) and entries 30..39 copy entries 0..9 (equal scores); tokens in `positive_w` have only
    positive weights, so their zeros sit at the bottom of the ranking, the others mixed signs.
    """
    g, _ = gen(seed)
    T = len(nvis)
    per = max(1, -(-max(max(nvis), 40) // bs))
    table, nb = random_table(g, slots, per)
    q = torch.randint(-2, 3, (T, H, d), generator=g).float()
    q[:, :, 0] = 2.0
    keys = torch.randint(-2, 3, (slots, per * bs, d), generator=g).float()
    keys[:, 5:25] = 0.0
    keys[:, 5:25, 0] = -3.0
    keys[:, 30:40] = keys[:, 0:10]
    pool = torch.zeros(nb, bs, d)
    for s in range(slots):
        pool[table[s].long()] = keys[s].view(per, bs, d)
    w = torch.tensor([0.5, -1.0, 0.25, 2.0] * (H // 4))[None, :].repeat(T, 1)
    for t in positive_w:
        w[t] = w[t].abs()
    tok_slot = torch.arange(T) % slots
    positions = torch.tensor(nvis) * RATIO + torch.arange(T) % (RATIO - 1)  # (p + 1) // 4 == nvis
    return q.to(dtype), w, pool.to(dtype), table, tok_slot, positions


def _exact_expected(case, topk, clamp=None):
    q, w, pool, table, tok_slot, positions = case
    nvis = (positions + 1) // RATIO
    if clamp is not None:
        nvis = nvis.clamp(max=clamp)
    return _expected(entry_scores64(q, w, pool, table, tok_slot, nvis), nvis, topk)


# ============================================================================ the key mapping
@triton.jit
def _keys_kernel(x_ptr, out_ptr, N: tl.constexpr):
    n = tl.arange(0, N)
    key = I._order_key(tl.load(x_ptr + n))
    tl.store(out_ptr + n, key.to(tl.int32, bitcast=True))


def test_order_key_preserves_float_order():
    vals = [float("-inf"), -3.4e38, -1e30, -2.0, -1.0000001, -1.0, -1e-30, -1e-40, -0.0, 0.0, 1e-45, 1e-40,
            1e-30, 1.0, 1.0000001, 2.0, 1e30, 3.4e38, float("inf")]
    x = torch.tensor(vals + [0.0] * (32 - len(vals)), dtype=F32)
    out = torch.zeros(32, dtype=torch.int32)
    x_d, out_d = dev(x, out)
    _keys_kernel[(1,)](x_d, out_d, N=32)
    key = out_d.cpu().long() & 0xFFFFFFFF  # unsigned
    # hand-computed: non-negatives get the sign bit set, negatives have every bit flipped, -0.0 is 0.0
    assert int(key[vals.index(1.0)]) == 0x3F800000 | 0x80000000
    assert int(key[vals.index(-1.0)]) == 0xBF800000 ^ 0xFFFFFFFF  # bits of -1.0: 0xBF800000
    assert int(key[8]) == int(key[9]) == 0x80000000, "-0.0 and 0.0 compare equal, so their keys must too"
    xs, ks = x.double(), key
    assert torch.equal(xs[:, None] < xs[None, :], ks[:, None] < ks[None, :])
    assert torch.equal(xs[:, None] == xs[None, :], ks[:, None] == ks[None, :])


# ============================================================================ the top-k kernel alone
def _score_rows():
    """Hand-made fp32 score rows [4, 2500] and nvis: ties, signed zeros, one-ulp steps, 3 scan tiles."""
    g = torch.Generator().manual_seed(5)
    S = 2500
    rows = torch.zeros(4, S)
    # row 0: 30 threes, 400 zeros of either sign, -2 elsewhere: topk 24 cuts inside the threes,
    # topk 100 inside the zeros, where -0.0 and 0.0 must tie (lowest ids first, whatever the sign)
    perm = torch.randperm(S, generator=g)
    rows[0] = -2.0
    rows[0, perm[:30]] = 3.0
    rows[0, perm[30:230]], rows[0, perm[230:430]] = 0.0, -0.0
    # row 1: 1 + i ulp in random order (keys differ in the low 12 bits: the last passes decide)
    rows[1] = (1.0 + torch.randperm(S, generator=g).double() * 2.0 ** -23).float()
    # row 2: wide magnitudes of both signs, with every value twice
    half = torch.randn(S // 2, generator=g) * 10.0 ** torch.randint(-30, 30, (S // 2,), generator=g)
    rows[2] = torch.cat([half, half])[torch.randperm(S, generator=g)]
    # row 3: negatives only, fewer visible entries than topk 24 and 100
    rows[3] = -torch.rand(S, generator=g) - 1.0
    return rows, torch.tensor([2400, 2000, S, 10], dtype=torch.int32)


def _guarded(rows, nvis, guard=16):
    """rows with NaN after each row's visible entries and in `guard` columns past the matrix; the view."""
    buf = torch.full((rows.shape[0], rows.shape[1] + guard), float("nan"))
    for t in range(rows.shape[0]):
        n = min(int(nvis[t]), rows.shape[1])
        buf[t, :n] = rows[t, :n]
    return buf, buf[:, : rows.shape[1]]


@pytest.mark.parametrize("rank_sort", [True, False], ids=["rank", "bitonic"])
@pytest.mark.parametrize("topk", [1, 24, 100])
def test_topk_kernel_on_hand_made_rows(topk, rank_sort):
    rows, nvis = _score_rows()
    nvis[2] = 2600  # past the matrix width (a caller's too small max_visible): clamped to 2500
    # a NaN has the largest key: any read past a row's visible entries would be picked
    buf, _ = _guarded(rows, nvis)
    (buf,) = dev(buf)
    out = torch.full((4, topk), -1, dtype=torch.int32, device=DEV)
    I._launch_topk(buf[:, :2500], *dev(nvis), out, rank_sort=rank_sort)
    assert torch.equal(out.cpu(), _expected(rows.double(), nvis.clamp(max=2500), topk))


# ============================================================================ indexer_topk, exact ties
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_exact_ties_resolved_lowest_id_first(dtype):
    topk = 12
    # visible counts 0, 1, < topk, == topk, == topk + 1, inside the dead block, past the copies
    nvis = [0, 1, 11, 12, 13, 20, 45, 45, 64]
    case = _exact_case(1, nvis, dtype=dtype, positive_w=(5, 6, 8))
    want = _exact_expected(case, topk)
    for mv in (None, max(nvis), _capacity(case), 300):
        assert torch.equal(_run(case, topk, mv), want), mv


def test_topk_wider_than_the_pool():
    case = _exact_case(2, [3, 40, 17, 0], positive_w=(1,))
    cap = _capacity(case)
    topk = cap + 9
    want = _exact_expected(case, topk)
    assert torch.equal(_run(case, topk), want)
    assert torch.equal(_run(case, topk, cap), want)


def test_visible_count_past_max_visible_is_clamped():
    # a caller bug: the token sees 60 entries but max_visible says 37; it must get the top-k of
    # its first 37, the others are unaffected, and neither kernel touches memory past column 37
    case = _exact_case(3, [20, 60, 37], positive_w=(1,))
    assert torch.equal(_run(case, 8, 37), _exact_expected(case, 8, clamp=37))
    q, w, pool, table, tok_slot, positions = dev(*case)
    nvis = ((positions + 1) // RATIO).int()
    buf = torch.full((3, 37 + 16), float("nan"), device=DEV)
    I._launch_scores(buf[:, :37], q, w, pool, table, tok_slot.int(), nvis, fill=False)
    buf = buf.cpu()
    assert bool(buf[:, 37:].isnan().all()), "scores written past max_visible"
    assert bool(buf[1, :37].isfinite().all()) and bool(buf[0, 20:].isnan().all())


# ============================================================================ indexer_topk, random cases
@pytest.mark.parametrize("T", [1, 3, 4, 5, 127, 128, 129])
def test_matches_reference_with_static_bound(T):
    max_pos = 700 if T <= 5 else 120
    case = indexer_case(200 + T, T, d=64, max_pos=max_pos)
    got = _run(case, 24, _capacity(case))
    _check_topk(got, *case, RATIO, 24)
    if T <= 5:
        assert torch.equal(got, _run(case, 24)), "the bound must not change the picks"


@pytest.mark.parametrize("dtype", [F32, BF16, F64])
def test_max_visible_bounds_give_identical_picks(dtype):
    case = indexer_case(31, 6, H=8, d=32, max_pos=300, dtype=dtype)
    case[5][:3] = torch.tensor([0, 2, 3])  # 0, 0, 1 visible
    true_max = int(((case[5] + 1) // RATIO).max())
    got = _run(case, 16)
    _check_topk(got, *case, RATIO, 16)
    for mv in (true_max, _capacity(case), 1000):
        assert torch.equal(_run(case, 16, mv), got), mv


# ============================================================================ graph safety
@pytest.mark.parametrize("dtype", [F32, F64])
def test_no_host_sync_with_max_visible(dtype):
    case = indexer_case(41, 5, H=8, d=32, max_pos=200, dtype=dtype)
    cap = _capacity(case)
    args = dev(*case)
    with HostSyncGuard():  # what a CUDA-graph capture would refuse (tolist on CPU tensors included)
        got = I.indexer_topk(*args, RATIO, 16, max_visible=cap)
    _check_topk(got, *case, RATIO, 16)
    with pytest.raises(GraphCaptureError), HostSyncGuard():
        I.indexer_topk(*args, RATIO, 16)  # the guard works: without a bound, nvis.max() is read


class _LaunchLog:
    """Stands in for a Triton kernel object and logs each launch's grid and argument shapes."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            sig = [(tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
            self.log.append((self.name, tuple(grid), sig, sorted(kwargs.items())))
            return launch(*args, **kwargs)
        return run


def test_launches_depend_only_on_shapes_and_bound(monkeypatch):
    logs = []
    # other contents and positions: at most 10 visible entries, then up to 150 (3 score tiles,
    # more than topk); the capacity is 156 entries in both
    for seed, max_pos in ((51, 40), (52, 600)):
        log = []
        monkeypatch.setattr(I, "_indexer_score_kernel", _LaunchLog("score", I._indexer_score_kernel, log))
        monkeypatch.setattr(I, "_topk_kernel", _LaunchLog("topk", I._topk_kernel, log))
        case = indexer_case(seed, 4, H=8, d=32, max_pos=600)
        case[5][:] = torch.randint(0, max_pos + 1, (4,), generator=torch.Generator().manual_seed(seed))
        case[5][0] = max_pos
        got = _run(case, 64, _capacity(case))
        monkeypatch.undo()
        _check_topk(got, *case, RATIO, 64)
        logs.append(log)
    assert len(logs[0]) == 2, "one scoring launch, one top-k launch"
    assert logs[0] == logs[1]
