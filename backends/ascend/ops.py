"""The Ascend backend's ops: CANN fused ops through torch_npu where they compute V4's semantics,
Triton-Ascend kernels for what CANN lacks.

`AscendOps(npu=...)` takes the module that provides the `npu_*` functions: the real `torch_npu`
on an Ascend machine, or `backends.ascend.emulation` (CPU emulations written from the
documentation, selected only on request). The mapping code below is the same either way, so the
emulation run executes every layout decision the NPU run makes.

Op by op (A2 = 910B, A3 = 910C; the 950 column is what the code does there, untested):

| op | path | why |
|---|---|---|
| rms_norm | CANN `npu_rms_norm` | exactly V4's weighted RMSNorm (fp32 inside) |
| rope | CANN `npu_rotary_mul(rotary_mode="interleave")` on the last 64 dims, BSND with B = 1 | V4's rope is interleaved; inverse = same op with -sin |
| indexer_topk | bf16/fp16 on A2/A3: CANN `npu_lightning_indexer`, one TND batch row per query; otherwise (fp32, 950, shapes outside its limits) Triton-Ascend score kernel + top-k | sparse_mode 3 is a right-down diagonal; V4's rule s < (t+1)/ratio is a staircase, so every query becomes its own row with Sk = (t+1)//ratio |
| attention | Triton-Ascend kernel | torch_npu's `npu_sparse_flash_attention` has no sink term and only the MLA-absorbed D = 512 + 64 form; vllm-ascend's `npu_sparse_attn_sharedkv` is not in torch_npu |
| compress | Triton-Ascend kernel | CANN's compressor is a vllm-ascend custom op, not in torch_npu |
| hc_pre / hc_post / hc_head | Triton-Ascend kernels | `npu_hc_pre/post` are vllm-ascend custom ops |
| moe_gate | Triton-Ascend kernel | `npu_moe_gating_top_k` documents softmax / sigmoid scoring only, not sqrt-softplus |
| moe_experts | CANN `npu_grouped_matmul` (m-axis groups, counts), clamped SwiGLU in torch | grouped GEMM; the clamp (limit 10) is not in `npu_swiglu` |
| linear | torch matmul (aclnn) for dequantised weights; W8A8: `npu_dynamic_quant` + `npu_quant_matmul` | A2/A3 have no FP8 / FP4 matmul |
| grouped_out_proj | torch bmm (aclnn BatchMatMul) for wo_a, then `linear` for wo_b | |

Weights (`runtime.backend_options.ascend.weights`, `--ascend-weights`): "dequant" (default) dequantises
FP8 / FP4 checkpoint weights at load into the working dtype; "w8a8" additionally quantises every
projection the model keeps in the 16-bit working dtype to int8 per output channel (activations per
token at run time). The projections the model keeps in fp32 (compressor, indexer weights, head) stay float.
"""  # noqa: E501 - the op table's markdown rows must each stay on one line

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backends.reference.ops import compress_rows_on_host
from v4 import quant
from v4.ops import DecodeRows, acc

from . import WEIGHT_FORMATS  # declared with the backend's options (runtime.backend_options.ascend.weights)
from .kernels import launch

IMPLEMENTED: tuple[str, ...] = (
    "rms_norm", "rope", "hc_pre", "hc_post", "hc_head", "compress", "indexer_topk", "attention",
    "moe_gate", "moe_experts", "linear", "grouped_out_proj",
)

# CANN op limits the adapter checks before choosing the CANN path (ascend.md §1.4, the op docs)
_LI_MAX_HEADS = 64
_LI_HEAD_DIM = 128
_LI_MAX_SPARSE = 2048


@dataclass
class W8A8Weight:
    """int8 weight stored [in, out] (the `x2` layout of npu_quant_matmul), one fp32 scale per output."""

    q_t: torch.Tensor  # int8 [K, N]
    scale: torch.Tensor  # fp32 [N]
    dtype: torch.dtype  # working dtype of the activations / outputs

    @property
    def shape(self):
        return (self.q_t.shape[1], self.q_t.shape[0])

    def dequantize(self) -> torch.Tensor:
        return (self.q_t.float() * self.scale).t().to(self.dtype)


def _int8_channels(w: torch.Tensor, k_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: scale = amax over the reduction dim / 127, q = round(w / scale)."""
    wf = w.float()
    scale = wf.abs().amax(k_dim, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(wf / scale).clamp(-127, 127).to(torch.int8)
    return q, scale.squeeze(k_dim)


def quantize_w8a8(w: torch.Tensor, dtype: torch.dtype) -> W8A8Weight:
    """A [N, K] weight as int8 per output channel, stored [K, N]."""
    q, scale = _int8_channels(w, 1)
    return W8A8Weight(q.t().contiguous(), scale.contiguous(), dtype)


@dataclass
class GroupedWeights:
    """Expert weights in the `npu_grouped_matmul` layout [E, K, N], float or int8 + per-channel scale."""

    w: torch.Tensor  # [E, K, N]
    scale: torch.Tensor | None  # fp32 [E, N] for int8 weights

    def __getitem__(self, e):  # one expert (the shared expert is a group of one)
        return GroupedWeights(self.w[e:e + 1], None if self.scale is None else self.scale[e:e + 1])


class AscendOps:
    name = "ascend"
    # not graph-safe yet: `compress` plans a DecodeBatch step on the host (compress_rows_on_host), so
    # decode runs eagerly here; `graph_capture` is what the step will be captured with once it is
    capturable = False

    def __init__(self, device="cpu", npu=None, weights: str = "dequant", chip: str | None = None):
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"runtime.backend_options.ascend.weights (formerly runtime.ascend_weights) must be one of "
                             f"{', '.join(WEIGHT_FORMATS)}, got {weights!r}")
        self.device = torch.device(device)
        self.npu = npu if npu is not None else importlib.import_module("torch_npu")
        self.emulated = bool(getattr(self.npu, "EMULATED", False))
        self.weights = weights
        self.chip = launch.CHIPS[chip or launch.chip_name()]
        self._ones: dict = {}
        self._rope_cache: list = []
        self.path: dict = {}  # op -> path last taken
        self.seen: set = set()  # every (op, path) taken so far (for reports and tests)

    @property
    def communicator_class(self):
        """Multi-device runs: the communicator with MC2's EP call shape (`comm.py`; emulated on CPU)."""
        from .comm import AscendCommunicator

        return AscendCommunicator

    def graph_capture(self, device):
        """Decode graphs on `device` (v4.graphs.GraphCapture): torch_npu's ACL graphs
        (`torch.npu.NPUGraph`, what vllm-ascend's ACLGraphWrapper captures) on an NPU, through the same
        `StreamCapture` as the cuda backend's CUDA graphs; None elsewhere (the CPU emulation has no
        graphs: HostSyncGuard stands in). torch_npu is imported here, on an NPU, never before."""
        if getattr(device, "type", str(device).split(":")[0]) != "npu":
            return None
        importlib.import_module("torch_npu")  # registers torch.npu (already done by the real make_ops)
        from v4.graphs import StreamCapture

        return StreamCapture("npu", torch.npu, torch.npu.NPUGraph, device, "ACL graph (torch.npu.NPUGraph)")

    def _took(self, op: str, path: str) -> None:
        self.path[op] = path
        self.seen.add((op, path))

    # ------------------------------------------------------------------ Triton-Ascend kernels
    # imported on first use: importing triton (and decorating the kernels) only once they run
    @staticmethod
    def _kernel(module: str):
        return importlib.import_module(f"{__package__}.kernels.{module}")

    def attention(self, q, window_kv, window_idx, comp_kv, comp_idx, sink, scale):
        return self._kernel("attention").attention(q, window_kv, window_idx, comp_kv, comp_idx, sink, scale)

    def compress(self, kv, score, ape, spec, norm_weight, inv_freq, state_kv, state_score, pool, block_table, seqs):
        if isinstance(seqs, DecodeRows):  # the kernel plans on the host; no graph capture on this backend
            return compress_rows_on_host(self.compress, kv, score, ape, spec, norm_weight, inv_freq, state_kv,
                                         state_score, pool, block_table, seqs)
        return self._kernel("compress").compress(kv, score, ape, spec, norm_weight, inv_freq, state_kv, state_score,
                                                 pool, block_table, seqs)

    def hc_pre(self, X, fn, base, scale, sinkhorn_iters, hc_eps, norm_eps):
        return self._kernel("mhc").hc_pre(X, fn, base, scale, sinkhorn_iters, hc_eps, norm_eps)

    def hc_post(self, y, X, post, comb):
        return self._kernel("mhc").hc_post(y, X, post, comb)

    def hc_head(self, X, fn, base, scale, hc_eps, norm_eps):
        return self._kernel("mhc").hc_head(X, fn, base, scale, hc_eps, norm_eps)

    def moe_gate(self, x, weight, bias, tid2eid, token_ids, topk, route_scale):
        return self._kernel("gate").moe_gate(x, weight, bias, tid2eid, token_ids, topk, route_scale)

    # ------------------------------------------------------------------ weights
    def prepare_linear(self, w, dtype: torch.dtype):
        if isinstance(w, quant.QuantizedWeight):
            w = w.dequantize(torch.float32)  # A2/A3 have no FP8 / FP4 matmul: dequantise at load
        if self.weights == "w8a8" and dtype in (torch.bfloat16, torch.float16):
            return quantize_w8a8(w.to(self.device), dtype)
        return w.to(device=self.device, dtype=dtype)

    def prepare_experts(self, w1s: list, w3s: list, w2s: list, dtype: torch.dtype):
        p = lambda w: (w.dequantize(torch.float32) if isinstance(w, quant.QuantizedWeight) else w).to(self.device)  # noqa: E731
        w13 = torch.stack([torch.cat([p(a), p(b)]).t() for a, b in zip(w1s, w3s)])  # [E, D, 2I]
        w2 = torch.stack([p(c).t() for c in w2s])  # [E, I, D]
        if self.weights == "w8a8" and dtype in (torch.bfloat16, torch.float16):
            return self._grouped_int8(w13), self._grouped_int8(w2)
        return GroupedWeights(w13.to(dtype).contiguous(), None), GroupedWeights(w2.to(dtype).contiguous(), None)

    @staticmethod
    def _grouped_int8(w: torch.Tensor) -> GroupedWeights:
        q, scale = _int8_channels(w, 1)  # [E, K, N]: one scale per expert and output channel
        return GroupedWeights(q.contiguous(), scale.contiguous())

    # ------------------------------------------------------------------ norm / rope
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        if x.dtype == torch.float64:
            raise ValueError(
                "the Ascend backend has no fp64 (NPUs do not compute in it); use float32 as the reference dtype"
            )
        if weight is None:
            key = (x.shape[-1], x.dtype)
            if key not in self._ones:
                self._ones[key] = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
            weight = self._ones[key]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]) if x.dim() < 2 else x
        self._took("rms_norm", "cann:npu_rms_norm")
        return self.npu.npu_rms_norm(x2, weight.to(x.dtype), eps)[0].reshape(shape)

    def _rope_tables(self, positions, inv_freq, dtype):
        for pos, inv, dt, tables in self._rope_cache:
            if pos is positions and inv is inv_freq and dt == dtype:
                return tables
        ang = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
        # interleaved layout: pair (2i, 2i+1) shares angle i -> [1, T, 1, r] (the 1S1D form for BSND)
        cos = ang.cos().repeat_interleave(2, -1)[None, :, None, :].to(dtype)
        sin = ang.sin().repeat_interleave(2, -1)[None, :, None, :].to(dtype)
        tables = (cos, sin, -sin)  # -sin: the inverse rotation of the attention output
        self._rope_cache = ([(positions, inv_freq, dtype, tables)] + self._rope_cache)[:4]
        return tables

    def rope(
        self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False
    ) -> torch.Tensor:
        r = 2 * inv_freq.numel()
        T = x.shape[0]
        cos, sin, neg_sin = self._rope_tables(positions, inv_freq, x.dtype)
        # cos/sin tables are built in fp32 and cast: for 16-bit x the op takes 16-bit tables. The mode
        # goes by position: the doc page names it rotary_mode, the Meta registration `mode`
        rot = x[..., -r:].reshape(1, T, -1, r).contiguous()  # BSND, B = 1, N = heads (or 1)
        out = x.clone()
        out[..., -r:] = self.npu.npu_rotary_mul(rot, cos, neg_sin if inverse else sin, "interleave").view(
            x[..., -r:].shape
        )
        self._took("rope", "cann:npu_rotary_mul")
        return out

    # ------------------------------------------------------------------ indexer
    def indexer_topk(self, q, weights, k_pool, block_table, tok_slot, positions, ratio: int, topk: int,
                     max_visible: int | None = None):
        T, H, D = q.shape
        fits = (q.dtype in (torch.bfloat16, torch.float16) and self.chip.generation in ("A2", "A3")
                and H <= _LI_MAX_HEADS and D == _LI_HEAD_DIM and topk <= _LI_MAX_SPARSE
                and k_pool.shape[1] % 16 == 0 and k_pool.shape[1] <= 1024 and k_pool.dtype == q.dtype)
        if not fits or T == 0:
            self._took("indexer_topk", "triton-ascend:indexer")
            return self._kernel("indexer").indexer_topk(
                q, weights, k_pool, block_table, tok_slot, positions, ratio, topk, max_visible=max_visible
            )
        # V4 lets query t see entries s < (t + 1) // ratio. sparse_mode 3 is right-down causal over
        # one row's keys, so each query is its own TND row (Sq = 1) whose key length is exactly
        # its visible count: then the causal mask admits all Sk keys and nothing else.
        dev = q.device
        one_per_row = torch.arange(1, T + 1, dtype=torch.int32, device=dev)
        nvis = torch.div(positions + 1, ratio, rounding_mode="floor").to(torch.int32)
        table = block_table[tok_slot.long()].to(torch.int32).contiguous()
        out = self.npu.npu_lightning_indexer(
            q.contiguous(), k_pool.unsqueeze(2).contiguous(), weights.to(q.dtype).contiguous(),
            actual_seq_lengths_query=one_per_row, actual_seq_lengths_key=nvis, block_table=table,
            layout_query="TND", layout_key="PA_BSND", sparse_count=topk, sparse_mode=3)[0]  # (indices, values)
        self._took("indexer_topk", "cann:npu_lightning_indexer")
        return out.view(T, topk)

    # ------------------------------------------------------------------ dense projections
    def linear(self, x: torch.Tensor, w, act_quant: bool = False) -> torch.Tensor:
        if act_quant:
            raise ValueError(
                "FP8 activation quantisation (exact mode) does not exist on A2/A3; run the Ascend backend in plain mode"
            )
        if isinstance(w, W8A8Weight):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).to(w.dtype)
            xq, xs = self.npu.npu_dynamic_quant(x2)
            y = self.npu.npu_quant_matmul(xq, w.q_t, w.scale, pertoken_scale=xs, output_dtype=w.dtype)
            self._took("linear", "cann:npu_dynamic_quant+npu_quant_matmul")
            return y.view(*shape[:-1], -1).to(x.dtype)
        self._took("linear", "torch:matmul")
        return F.linear(x if x.dtype == w.dtype else x.to(w.dtype), w)

    def grouped_out_proj(self, o, wo_a, wo_b, groups: int, act_quant: bool = False):
        wa = wo_a.dequantize() if isinstance(wo_a, W8A8Weight) else wo_a  # wo_a runs as a bf16 batched matmul
        T = o.shape[0]
        og = o.to(wa.dtype).view(T, groups, -1).transpose(0, 1)
        z = torch.bmm(og, wa.view(groups, -1, og.shape[-1]).transpose(1, 2)).transpose(0, 1).reshape(T, -1)
        return self.linear(z, wo_b, act_quant)

    # ------------------------------------------------------------------ MoE
    def _grouped(self, h: torch.Tensor, w: GroupedWeights, counts: torch.Tensor, out_dtype) -> torch.Tensor:
        # group_list as counts (type 1) may not have one entry, and an expert-parallel rank may hold a
        # single expert (V4-Pro over 384 dies): a one-entry list goes as cumulative sums (type 0), the same groups
        kind = 1 if counts.numel() > 1 else 0
        groups = counts if kind == 1 else counts.cumsum(0)
        if w.scale is None:
            return self.npu.npu_grouped_matmul([h.to(w.w.dtype)], [w.w], group_list=groups, split_item=2, group_type=0,
                                               group_list_type=kind)[0]
        hq, hs = self.npu.npu_dynamic_quant(h.to(out_dtype))
        return self.npu.npu_grouped_matmul([hq], [w.w], scale=[w.scale], per_token_scale=[hs], group_list=groups,
                                           split_item=2, group_type=0, group_list_type=kind, output_dtype=out_dtype)[0]

    def _single(self, h: torch.Tensor, w: GroupedWeights) -> torch.Tensor:
        """One expert (the shared one): a plain / quantised matmul (group lists of length 1 are not allowed)."""
        if w.scale is None:
            return h.to(w.w.dtype) @ w.w[0]
        hq, hs = self.npu.npu_dynamic_quant(h)
        return self.npu.npu_quant_matmul(hq, w.w[0], w.scale[0], pertoken_scale=hs, output_dtype=h.dtype)

    def _swiglu(self, h, limit, a):
        h1, h3 = h.to(a).chunk(2, dim=-1)
        return F.silu(h1.clamp(max=limit)) * h3.clamp(min=-limit, max=limit)

    def moe_experts(self, x, ids, weights, w13: GroupedWeights, w2: GroupedWeights, shared, limit: float,
                    act_quant: bool = False):
        if act_quant:
            raise ValueError(
                "FP8 activation quantisation (exact mode) does not exist on A2/A3; run the Ascend backend in plain mode"
            )
        a = acc(x.dtype)
        T, k = ids.shape
        E = w13.w.shape[0]
        flat = ids.reshape(-1).long()
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert: the m-axis groups
        counts = torch.bincount(flat, minlength=E).to(torch.int64)
        tok = order // k
        h = self._grouped(x[tok], w13, counts, x.dtype)  # [T*k, 2I]
        h = (self._swiglu(h, limit, a) * weights.reshape(-1)[order].to(a).unsqueeze(-1)).to(x.dtype)
        yk = self._grouped(h, w2, counts, x.dtype)  # [T*k, D]
        y = torch.zeros(T, yk.shape[1], dtype=a, device=x.device).index_add_(0, tok, yk.to(a))
        if shared is not None:
            s13, s2 = shared
            hs = self._swiglu(self._single(x, s13), limit, a).to(x.dtype)
            y += self._single(hs, s2).to(a)
        self._took("moe_experts", "cann:npu_grouped_matmul" + ("(int8)" if w13.scale is not None else ""))
        return y.to(x.dtype)
