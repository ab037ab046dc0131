"""CPU emulations of the torch_npu / CANN ops the Ascend adapter calls. NOT the real ops.

Each function has the name, argument names, conventions and return structure of the torch_npu 2.14
API (signatures and output shapes as the wheel's Meta registrations,
`torch_npu/op_plugin/meta/_meta_registrations.py`, declare them) and computes what that op's
documentation (`torch_npu/_op_plugin_docs.py` of the torch-npu 2.14.0 wheel) says it computes, in
plain PyTorch on any device. They exist so that the adapter in `backends/ascend/ops.py` (which maps
our packed / paged layouts onto those ops: TND layouts, `actual_seq_lengths`, block tables,
`sparse_mode`, quant scales) is executed and checked on machines without an NPU. They are selected
only on request (`DSV4_ASCEND_EMULATE=1`), never by `auto`, and every report that used them says
"emulated on CPU".

What an emulation cannot tell: the real kernels' accumulation order and internal precision, and
anything the documentation leaves open. Where the documentation is silent we chose the
mathematically plain answer and say so ([doc silent] below); the argument checks enforce the
documented limits (dtypes, layouts, ranges), so an adapter that violates them fails here too.
"""

from __future__ import annotations

import torch

EMULATED = True  # the adapter and reports read this to say "emulated on CPU"

_F16 = (torch.float16, torch.bfloat16)


def _need(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{op} (emulated): {msg}")


# ------------------------------------------------------------------------------------------ norm / rope


def npu_rms_norm(self: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6):
    """(y, rstd): y = gamma * x / sqrt(mean(x^2) + eps) over the last dim; rstd in fp32."""
    op = "npu_rms_norm"
    _need(
        self.dtype in (torch.float16, torch.bfloat16, torch.float32),
        op,
        f"x dtype must be fp16/bf16/fp32, got {self.dtype}",
    )
    _need(gamma.dtype == self.dtype, op, f"gamma dtype {gamma.dtype} must equal x dtype {self.dtype}")
    _need(2 <= self.dim() <= 8, op, f"x must have 2-8 dims, got {self.dim()}")
    xf = self.float()
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + epsilon)  # [doc silent] fp32 inside
    return (gamma.float() * (xf * rstd)).to(self.dtype), rstd


def npu_rotary_mul(input: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half", rotate=None):
    """output = r1 * input + r2 * x_new; interleave mode x_new pairs (x0, x1) -> (-x1, x0)."""
    op = "npu_rotary_mul"
    _need(rotate is None, op, "the rotate-matrix form is not emulated")
    _need(rotary_mode in ("half", "interleave"), op, f"rotary_mode must be 'half' or 'interleave', got {rotary_mode!r}")
    _need(input.dim() == 4 and r1.dim() == 4 and r2.dim() == 4, op, "input, r1 and r2 must be 4-D")
    B, S, N, D = input.shape  # the BSND reading of the documented layouts
    _need(D % 2 == 0 and D < 896, op, f"D must be even and < 896, got {D}")
    if rotary_mode == "interleave":
        _need(B * N < 1000, op, f"interleave mode needs B * N < 1000, got {B * N}")
        _need(r1.shape == (1, S, 1, D) and r2.shape == r1.shape, op,
              f"interleave mode with BSND input takes r1/r2 of shape 1S1D = {(1, S, 1, D)}, got {tuple(r1.shape)}")
    x = input.float()
    if rotary_mode == "interleave":
        x_new = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    else:
        x1, x2 = x.chunk(2, dim=-1)
        x_new = torch.cat((-x2, x1), dim=-1)
    return (r1.float() * x + r2.float() * x_new).to(input.dtype)  # [doc silent] fp32 inside


# ------------------------------------------------------------------------------------------ indexer


def _check_indexer_args(query, key, weights, actual_seq_lengths_query, actual_seq_lengths_key, block_table,
                        layout_query, layout_key, sparse_count, sparse_mode, pre_tokens, next_tokens) -> None:
    """The arguments `npu_lightning_indexer` emulates, checked in the order it reports them."""
    op = "npu_lightning_indexer"
    _need(layout_query == "TND" and layout_key == "PA_BSND", op,
          f"only layout_query='TND' with layout_key='PA_BSND' is emulated, got {layout_query!r}/{layout_key!r}")
    _need(query.dtype in _F16 and key.dtype == query.dtype and weights.dtype == query.dtype, op,
          f"query/key/weights must be one of bfloat16/float16, got {query.dtype}/{key.dtype}/{weights.dtype}")
    _need(query.dim() == 3, op, f"TND query must be [T, N1, D], got {tuple(query.shape)}")
    T, N1, D = query.shape
    _need(N1 <= 64, op, f"query heads N1 must be <= 64, got {N1}")
    _need(key.dim() == 4 and key.shape[2] == 1 and key.shape[3] == D, op,
          f"PA_BSND key must be [block_count, block_size, 1, {D}], got {tuple(key.shape)}")
    bs = key.shape[1]
    _need(bs % 16 == 0 and bs <= 1024, op, f"block_size must be a multiple of 16 and <= 1024, got {bs}")
    _need(weights.shape == (T, N1), op, f"weights must be [T, N1] = {(T, N1)}, got {tuple(weights.shape)}")
    _need(1 <= sparse_count <= 2048 or sparse_count in (3072, 4096, 5120, 6144, 7168, 8192), op,
          f"sparse_count must be in 1..2048 or 3072..8192 step 1024, got {sparse_count}")
    _need(sparse_mode in (0, 3), op, f"sparse_mode must be 0 or 3, got {sparse_mode}")
    _need(
        pre_tokens == 2**63 - 1 and next_tokens == 2**63 - 1,
        op,
        "only the default pre_tokens / next_tokens are emulated",
    )
    _need(query.numel() > 0 and key.numel() > 0, op, "query and key must not be empty")
    for name, t in (
        ("actual_seq_lengths_query", actual_seq_lengths_query),
        ("actual_seq_lengths_key", actual_seq_lengths_key),
        ("block_table", block_table),
    ):
        _need(t is not None and t.dtype == torch.int32, op, f"{name} must be an int32 tensor")
    cu = actual_seq_lengths_query.tolist()
    B = len(cu)
    _need(cu == sorted(cu) and (not cu or (cu[0] >= 0 and cu[-1] == T)), op,
          f"actual_seq_lengths_query must be non-decreasing prefix sums ending at T={T}")
    _need(actual_seq_lengths_key.shape == (B,) and block_table.dim() == 2 and block_table.shape[0] == B, op,
          f"actual_seq_lengths_key must be [B={B}] and block_table [B, max_blocks]")


def npu_lightning_indexer(query, key, weights, *, actual_seq_lengths_query=None, actual_seq_lengths_key=None,
                          block_table=None, layout_query="BSND", layout_key="BSND", sparse_count=2048, sparse_mode=3,
                          pre_tokens=2**63 - 1, next_tokens=2**63 - 1, return_value=False):
    """Top-`sparse_count` keys per query by score_s = sum_h w_h relu(q_h . k_s) (DeepSeek's lightning
    indexer), int32 positions within the query's batch row, -1 where fewer keys are visible.

    Emulated: layout_query "TND" (actual_seq_lengths_query = prefix sums, required) and layout_key
    "PA_BSND" (key [block_count, block_size, N2 = 1, D] through block_table [B, max_blocks]).
    sparse_mode 3 (rightDownCausal): query i of a batch row with Sq queries and Sk keys sees keys
    j <= i + Sk - Sq; sparse_mode 0: all Sk keys. Returns (indices int32 [T, N2, sparse_count],
    values): values are the selected scores in query's dtype with return_value, else an empty tensor
    (the tuple of the Meta registration; the doc page's "-> Tensor" names only the first).
    [doc silent] order of the selected positions (we return descending score) and scores in fp32.
    """
    op = "npu_lightning_indexer"
    _check_indexer_args(query, key, weights, actual_seq_lengths_query, actual_seq_lengths_key, block_table,
                        layout_query, layout_key, sparse_count, sparse_mode, pre_tokens, next_tokens)
    T, N1, D = query.shape
    bs = key.shape[1]
    cu = actual_seq_lengths_query.tolist()
    B = len(cu)
    out = torch.full((T, 1, sparse_count), -1, dtype=torch.int32, device=query.device)
    vals = torch.full((T, 1, sparse_count), float("-inf"), dtype=torch.float32, device=query.device)
    flat = key.view(-1, D)
    start = 0
    for b in range(B):
        end, sk = cu[b], int(actual_seq_lengths_key[b])
        sq = end - start
        _need(sk <= block_table.shape[1] * bs, op, f"batch row {b}: {sk} keys exceed its block_table row")
        if sq == 0 or sk == 0:
            start = end
            continue
        j = torch.arange(sk, device=query.device)
        keys = flat[block_table[b, j // bs].long() * bs + j % bs].float()  # [Sk, D]
        s = torch.relu(torch.einsum("thd,sd->ths", query[start:end].float(), keys))
        s = (s * weights[start:end].float().unsqueeze(-1)).sum(1)  # [Sq, Sk]
        if sparse_mode == 3:
            i = torch.arange(sq, device=query.device)
            s = s.masked_fill(j[None, :] > (i + sk - sq)[:, None], float("-inf"))
        k = min(sparse_count, sk)
        val, idx = s.topk(k, dim=-1)
        out[start:end, 0, :k] = torch.where(torch.isinf(val), -1, idx).to(torch.int32)
        vals[start:end, 0, :k] = val
        start = end
    return out, (vals.to(query.dtype) if return_value else query.new_empty(0))


# ------------------------------------------------------------------------------------------ quantised matmul


def npu_dynamic_quant(x: torch.Tensor, *, smooth_scales=None, group_index=None, dst_type=None):
    """Per-token symmetric int8: scale = rowmax|x| / 127, y = round(x / scale). Returns (y, scale fp32)."""
    op = "npu_dynamic_quant"
    _need(smooth_scales is None and group_index is None, op, "smooth_scales / group_index are not emulated")
    _need(dst_type in (None, torch.int8), op, f"only dst_type int8 is emulated, got {dst_type}")
    _need(x.dtype in _F16, op, f"x dtype must be float16/bfloat16, got {x.dtype}")
    _need(x.dim() > 1, op, "x must have more than one dim")
    xf = x.float()
    scale = xf.abs().amax(-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    # [doc silent] rounding mode: round half to even; all-zero rows give zeros with scale 0
    y = torch.round(xf / safe.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return y, scale


def npu_quant_matmul(x1: torch.Tensor, x2: torch.Tensor, scale: torch.Tensor, *, offset=None, pertoken_scale=None,
                     bias=None, output_dtype=None):
    """y = (x1 @ x2, int32 accumulation) * scale[n] * pertoken_scale[m] (+ bias), cast to output_dtype."""
    op = "npu_quant_matmul"
    _need(x1.dtype == torch.int8 and x2.dtype == torch.int8, op, f"x1/x2 must be int8 here, got {x1.dtype}/{x2.dtype}")
    _need(x1.dim() == 2 and x2.dim() == 2 and x1.shape[1] == x2.shape[0], op,
          f"x1 [m, k] and x2 [k, n] expected, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    _need(offset is None, op, "offset is not emulated")
    m, n = x1.shape[0], x2.shape[1]
    _need(scale.dim() == 1 and scale.shape[0] in (1, n) and scale.dtype in (torch.float32, torch.bfloat16), op,
          f"scale must be float32/bfloat16 [1] or [n={n}], got {scale.dtype} {tuple(scale.shape)}")
    _need(pertoken_scale is None or (pertoken_scale.shape == (m,) and pertoken_scale.dtype == torch.float32), op,
          f"pertoken_scale must be float32 [m={m}]")
    _need(
        output_dtype in (torch.float16, torch.bfloat16),
        op,
        f"only float16/bfloat16 outputs are emulated, got {output_dtype}",
    )
    # int8 x int8 products summed in int32 are exact; fp64 matmul of the integers is exact too for k < 2^37
    acc = (x1.double() @ x2.double()).float()
    y = acc * scale.float()
    if pertoken_scale is not None:
        y = y * pertoken_scale.unsqueeze(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(output_dtype)


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                       per_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                       activation_quant_offset=None, split_item=0, group_type=None, group_list_type=0, act_type=0,
                       output_dtype=None, tuning_config=None):
    """Grouped matmul, m-axis grouping (group_type 0) of one x [M, K] against weight [g, K, N].

    Rows of group i (from group_list: cumulative sums (type 0) or counts (type 1)) multiply
    weight[i]. Float: y = x w (fp32 accumulation, output in x's dtype). Per-token quantised
    (x, weight int8; scale [g, N] fp32; per_token_scale [M] fp32): y = (x w) * scale[i] * pts[m].
    Emulated form only: split_item 2/3 (one output tensor), single-tensor lists, group_list tensor.
    """
    op = "npu_grouped_matmul"
    _need(isinstance(x, (list, tuple)) and len(x) == 1 and isinstance(weight, (list, tuple)) and len(weight) == 1, op,
          "only single-tensor x / weight lists are emulated")
    _need(split_item in (2, 3) and group_type == 0 and group_list is not None and torch.is_tensor(group_list), op,
          "only split_item 2/3, group_type 0 with a group_list tensor is emulated")
    _need(group_list.dtype == torch.int64, op, f"group_list must be int64, got {group_list.dtype}")
    _need(
        act_type == 0 and bias is None and offset is None and antiquant_scale is None and antiquant_offset is None,
        op,
        "activation / bias / offset / antiquant arguments are not emulated",
    )
    a, w = x[0], weight[0]
    _need(a.dim() == 2 and w.dim() == 3 and w.shape[1] == a.shape[1], op,
          f"x [M, K] and weight [g, K, N] expected, got {tuple(a.shape)} and {tuple(w.shape)}")
    g = w.shape[0]
    _need(group_list.shape == (g,), op, f"group_list must have g={g} entries, got {tuple(group_list.shape)}")
    _need(group_list_type in (0, 1), op, f"group_list_type must be 0 or 1, got {group_list_type}")
    _need(group_list_type == 0 or g != 1, op, "group_list_type 1 (counts) does not allow a group_list of length 1")
    counts = group_list if group_list_type == 1 else torch.diff(group_list, prepend=group_list.new_zeros(1))
    _need(bool((counts >= 0).all()) and int(counts.sum()) <= a.shape[0], op, "group sizes must be >= 0 and fit in M")
    quantised = a.dtype == torch.int8
    if quantised:
        _need(w.dtype == torch.int8 and scale is not None and per_token_scale is not None, op,
              "int8 x needs int8 weight, scale and per_token_scale")
        sc, pts = scale[0], per_token_scale[0]
        _need(sc.shape == (g, w.shape[2]) and sc.dtype == torch.float32 and pts.shape == (a.shape[0],), op,
              "scale must be float32 [g, N] and per_token_scale [M]")
        out_dtype = output_dtype or torch.bfloat16
    else:
        _need(a.dtype in (torch.float16, torch.bfloat16, torch.float32) and w.dtype == a.dtype, op,
              f"float x and weight must share fp16/bf16/fp32, got {a.dtype}/{w.dtype}")
        out_dtype = a.dtype
    y = torch.zeros(a.shape[0], w.shape[2], dtype=torch.float32, device=a.device)
    start = 0
    for i, n in enumerate(counts.tolist()):
        if n:
            rows = slice(start, start + n)
            if quantised:
                y[rows] = (a[rows].double() @ w[i].double()).float() * sc[i] * pts[rows].unsqueeze(-1)
            else:
                y[rows] = a[rows].float() @ w[i].float()
        start += n
    return [y.to(out_dtype)]


def npu_format_cast(t: torch.Tensor, acl_format: int) -> torch.Tensor:
    """Changes the on-chip layout (e.g. 29 = FRACTAL_NZ) only; values are unchanged."""
    return t
