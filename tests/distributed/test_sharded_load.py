"""Sharded loading: each rank reads only its slices of the unsharded official checkpoint.

`load_checkpoint(..., select=rank_slice for one rank)` must give exactly what the full load cut by
`shard_weights` gives, read only that rank's bytes (figures checked against a by-hand sum over the
safetensors headers), and refuse a broken checkpoint exactly as a full load does.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from v4.dist import ParallelConfig
from v4.dist.shard import SKIP, WHOLE, Slice, rank_slice, shard_weights
from v4.errors import CheckpointError
from v4.quant import QuantizedWeight
from v4.weights import INDEX_FILE, expected_tensors, init_checkpoint, load_checkpoint, scale_name

LAYOUTS = [
    ParallelConfig(tp=2),
    ParallelConfig(tp=1, dp=2, ep=True),
    ParallelConfig(tp=2, ep=True),
    ParallelConfig(tp=2, dp=2, ep=True),
]
EP4 = ParallelConfig(tp=2, dp=2, ep=True)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_cfg):
    root = tmp_path_factory.mktemp("sharded")
    return {q: init_checkpoint(tiny_cfg, root / q, quant=q, seed=0, progress=False) for q in ("fp32", "fp8")}


@pytest.fixture(scope="module")
def full(ckpts, tiny_cfg):
    return {q: load_checkpoint(p, tiny_cfg, progress=False)[1] for q, p in ckpts.items()}


def load_rank(path, cfg, layout, rank, report=None):
    place = layout.rank(cfg, rank)
    _, w = load_checkpoint(path, cfg, progress=False, select=lambda n: rank_slice(n, cfg, place), report=report)
    return w


def as_float(t) -> torch.Tensor:
    if isinstance(t, QuantizedWeight):
        return t.dequantize(torch.float32)
    return t.to(torch.float32) if t.is_floating_point() else t


# ------------------------------------------------------------------------------------------
# the bytes a slice reads, by hand from the safetensors headers


ELEMENT_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "I64": 8, "I32": 4}


def headers(root: Path) -> dict[str, tuple[str, list[int]]]:
    """{stored name: (dtype, shape)} over every shard of a checkpoint."""
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            h = json.loads(fh.read(n))
        out.update({k: (v["dtype"], v["shape"]) for k, v in h.items() if k != "__metadata__"})
    return out


def nbytes(entry) -> int:
    dtype, shape = entry
    return ELEMENT_BYTES[dtype] * int(torch.tensor(shape).prod())


def slice_bytes(hdr, name: str, answer) -> int:
    """Stored bytes a rank reads of weight `name` (and its scale) for a rank_slice answer.

    A slice of a quantised weight reads every scale cell it touches and the data under them:
    cells are 128 x 128 for FP8 (F8_E4M3); for packed FP4 (I8) one row x 32 inputs. On cell
    boundaries that is exactly the slice; off them it is the covering run of cells.
    """
    if answer == SKIP:
        return 0
    data = hdr[name]
    scale = hdr.get(scale_name(name))
    if answer == WHOLE:
        return nbytes(data) + (nbytes(scale) if scale else 0)
    d, start, stop = answer.dim, answer.start, answer.stop
    if scale is None:  # plain: one stored element per logical element
        return nbytes(data) * (stop - start) // data[1][d]
    cell = 128 if data[0] == "F8_E4M3" else (1 if d == 0 else 32)
    n = data[1][d] * (2 if data[0] == "I8" and d == 1 else 1)  # logical size along d
    lo, hi = start // cell * cell, min(-(-stop // cell) * cell, n)
    n_cells = scale[1][d]
    return nbytes(data) * (hi - lo) // n + nbytes(scale) * (-(-hi // cell) - lo // cell) // n_cells


def rank_bytes_by_hand(root: Path, cfg, layout, rank) -> int:
    hdr = headers(root)
    place = layout.rank(cfg, rank)
    return sum(slice_bytes(hdr, name, rank_slice(name, cfg, place)) for name in expected_tensors(cfg))


# ------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("quant", ["fp32", "fp8"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.describe().replace(" ", ""))
def test_sharded_load_equals_full_load_cut(ckpts, full, tiny_cfg, quant, layout):
    layout.check(tiny_cfg)
    for rank in range(layout.world_size):
        want = shard_weights(full[quant], tiny_cfg, layout.rank(tiny_cfg, rank))
        report = {}
        got = load_rank(ckpts[quant], tiny_cfg, layout, rank, report)
        assert list(got) == list(want), f"rank {rank}: key sets differ"
        for name, w in want.items():
            assert torch.equal(as_float(got[name]), as_float(w)), f"rank {rank}: {name} differs"
        # the bytes it read are the header arithmetic's figure for this rank, to the byte
        assert report["bytes_read"] == rank_bytes_by_hand(ckpts[quant], tiny_cfg, layout, rank)
        hdr = headers(ckpts[quant])  # tensors counts stored tensors read: weights and their scales
        assert report["tensors"] == len(got) + sum(scale_name(n) in hdr for n in got)


def test_fp8_slices_keep_or_dequantise(ckpts, full, tiny_cfg):
    """Both FP8 branches under TP2: wq_b rows are heads*head_dim = 256 per rank (on the 128 block
    grid: the stored form is kept, data and block scales cut); wo_a rows are o_lora_rank = 16 per
    group (off the grid: the covering blocks are read, dequantised and cut to float32). FP4 expert
    rows and 32-aligned columns stay packed."""
    w = load_rank(ckpts["fp8"], tiny_cfg, ParallelConfig(tp=2), 1)
    wq_b = w["layers.0.attn.wq_b.weight"]
    assert isinstance(wq_b, QuantizedWeight) and wq_b.fmt == "fp8"
    assert tuple(wq_b.data.shape) == (256, 32) and tuple(wq_b.scale.shape) == (2, 1)
    assert wq_b.data.dtype == torch.float8_e4m3fn
    wo_a = w["layers.0.attn.wo_a.weight"]
    assert not isinstance(wo_a, QuantizedWeight) and wo_a.dtype == torch.float32 and tuple(wo_a.shape) == (16, 256)
    assert torch.equal(wo_a, full["fp8"]["layers.0.attn.wo_a.weight"].dequantize(torch.float32)[16:32])
    wo_b = w["layers.0.attn.wo_b.weight"]  # columns 16..32: off the grid as well
    assert not isinstance(wo_b, QuantizedWeight) and tuple(wo_b.shape) == (64, 16)
    for name, shape in (("layers.1.ffn.experts.3.w1.weight", (32, 32)), ("layers.1.ffn.experts.3.w2.weight", (64, 16))):
        e = w[name]  # FP4 rows 32..64 of w1; columns 32..64 of w2 (packed 16..32, scales 1..2)
        assert isinstance(e, QuantizedWeight) and e.fmt == "fp4" and tuple(e.data.shape) == shape


@pytest.mark.parametrize(
    "name,answer",
    [
        ("layers.0.attn.wq_b.weight", Slice(0, 100, 300)),  # FP8 rows across a block edge
        ("layers.0.attn.wq_b.weight", Slice(0, 128, 512)),  # FP8 on the grid
        ("layers.0.attn.wo_a.weight", Slice(1, 120, 250)),  # FP8 columns off the grid
        ("layers.0.attn.wo_a.weight", Slice(1, 128, 256)),  # FP8 columns on the grid, stop = end
        ("layers.1.ffn.experts.2.w2.weight", Slice(1, 16, 48)),  # FP4 columns off the 32 grid
        ("layers.1.ffn.experts.2.w2.weight", Slice(0, 5, 9)),  # FP4 rows: any range
        ("layers.1.ffn.experts.2.w2.weight", Slice(1, 0, 0)),  # empty
        ("embed.weight", Slice(0, 7, 301)),  # plain BF16 rows
        ("layers.0.hc_attn_fn", Slice(1, 3, 70)),  # plain F32 columns
        ("layers.0.ffn.gate.tid2eid", Slice(0, 10, 20)),  # I64 rows
        ("layers.0.attn.attn_sink", Slice(0, 1, 3)),  # 1-D
    ],
)
def test_any_slice_matches_full_load(ckpts, full, tiny_cfg, name, answer):
    report = {}
    _, w = load_checkpoint(ckpts["fp8"], tiny_cfg, progress=False, select=lambda n: answer if n == name else SKIP,
                           report=report)
    assert list(w) == [name]
    want = as_float(full["fp8"][name]).narrow(answer.dim, answer.start, answer.stop - answer.start)
    assert torch.equal(as_float(w[name]), want)
    assert report["bytes_read"] == slice_bytes(headers(ckpts["fp8"]), name, answer)


# ------------------------------------------------------------------------------------------
# bytes


def test_ep4_ranks_read_about_a_quarter(tmp_path, tiny_cfg):
    """DP2 x TP2 + EP4 on a tiny variant whose weights are mostly routed experts: each rank reads
    about a quarter of the checkpoint, and the four figures are the header arithmetic's exactly.
    (FP32 storage: in the FP8 form the FP4 experts shrink 8x while the replicated attention
    shrinks 2-4x, so the replicated part would weigh more than 15% of a quarter there.)"""
    cfg = dataclasses.replace(tiny_cfg, n_routed_experts=64, moe_intermediate_size=256)
    cfg.validate()
    EP4.check(cfg)
    root = init_checkpoint(cfg, tmp_path / "moe", quant="fp32", seed=0, progress=False)
    hdr = headers(root)
    total = sum(nbytes(e) for e in hdr.values())
    reports = []
    for rank in range(EP4.world_size):
        rep = {}
        load_rank(root, cfg, EP4, rank, rep)
        reports.append(rep)
    by_hand = [
        sum(slice_bytes(hdr, n, rank_slice(n, cfg, EP4.rank(cfg, r))) for n in expected_tensors(cfg))
        for r in range(EP4.world_size)
    ]
    for rank, rep in enumerate(reports):
        assert rep["bytes_total"] == total == json.loads((root / INDEX_FILE).read_text())["metadata"]["total_size"]
        assert abs(rep["bytes_read"] - total / 4) <= 0.15 * total / 4, (rank, rep, total / 4)
        assert rep["bytes_read"] == by_hand[rank]
    assert sum(r["bytes_read"] for r in reports) == sum(by_hand)


def test_reads_go_through_get_slice(ckpts, tiny_cfg, monkeypatch):
    """At the safetensors boundary: a sliced tensor is fetched with get_slice (which reads only the
    indexed bytes), a WHOLE one with get_tensor, a SKIP one not at all."""
    import safetensors

    calls: dict[str, str] = {}
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            self.fh = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_tensor(self, name):
            calls[name] = "tensor"
            return self.fh.get_tensor(name)

        def get_slice(self, name):
            calls[name] = "slice"
            return self.fh.get_slice(name)

    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **kw: Spy(real_open(*a, **kw)))
    place = EP4.rank(tiny_cfg, 2)
    load_rank(ckpts["fp8"], tiny_cfg, EP4, 2)
    hdr = headers(ckpts["fp8"])
    want = {}
    for name in expected_tensors(tiny_cfg):
        answer = rank_slice(name, tiny_cfg, place)
        if answer != SKIP:
            for stored in (name, scale_name(name)):
                if stored in hdr:
                    want[stored] = "tensor" if answer == WHOLE else "slice"
    assert calls == want
    assert "slice" in calls.values() and len(calls) < len(hdr)


def test_full_load_reads_everything(ckpts, tiny_cfg):
    for q, root in ckpts.items():
        rep = {}
        _, w = load_checkpoint(root, tiny_cfg, progress=False, report=rep)
        assert rep["bytes_read"] == rep["bytes_total"] == sum(nbytes(e) for e in headers(root).values())
        assert rep["tensors"] == len(headers(root))


def test_skipped_experts_are_neither_read_nor_returned(ckpts, tiny_cfg):
    layout = ParallelConfig(tp=1, dp=2, ep=True)
    full_rep, rep = {}, {}
    load_checkpoint(ckpts["fp8"], tiny_cfg, progress=False, report=full_rep)
    w = load_rank(ckpts["fp8"], tiny_cfg, layout, 1, rep)  # rank 1 holds experts 4..7
    for layer in ("layers.0", "layers.3", "mtp.0"):
        for e in range(tiny_cfg.n_routed_experts):
            held = any(k.startswith(f"{layer}.ffn.experts.{e}.") for k in w)
            assert held == (e >= 4), (layer, e)
    assert "layers.0.ffn.shared_experts.w1.weight" in w
    assert rep["bytes_read"] < full_rep["bytes_read"] == rep["bytes_total"]


# ------------------------------------------------------------------------------------------
# a broken checkpoint is refused as before


@pytest.mark.parametrize(
    "name,bad",
    [
        ("layers.2.ffn.experts.7.w1.weight", torch.zeros(64, 32, dtype=torch.float32)),  # rank 0 skips it
        ("layers.1.attn.wo_a.weight", torch.zeros(32, 128, dtype=torch.float32)),  # rank 0 slices it
        ("layers.1.attn.wq_b.weight", torch.zeros(512, 32, dtype=torch.int32)),  # dtype
    ],
)
def test_broken_checkpoint_refused_as_by_full_load(ckpts, tiny_cfg, tmp_path, name, bad):
    root = Path(shutil.copytree(ckpts["fp32"], tmp_path / "broken"))
    shard = root / json.loads((root / INDEX_FILE).read_text())["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = bad
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as full_err:
        load_checkpoint(root, tiny_cfg, progress=False)
    with pytest.raises(CheckpointError) as rank_err:
        load_rank(root, tiny_cfg, EP4, 0)
    assert str(rank_err.value) == str(full_err.value) and name in str(full_err.value)
