"""Triton-Ascend kernels for the ops CANN / torch_npu lack (compressor, mHC, sink attention, gating, ...).

Written for the chip (spec ascend.md §2.2), not ported GPU tiles:
- 1D grid of at most `launch.programs(kind, work)` programs, the AI-core count for kernels with
  `tl.dot` (cube) or the vector-core count otherwise; each program walks its share of the work
  items in a persistent loop `for item in range(pid, n_items, NPROG)` (the grid binds to
  physical cores on Ascend; a GPU-style grid of thousands of programs would be serialised).
- Tiles sized so that everything a loop iteration keeps live fits half the Unified Buffer
  (`launch.UB_BYTES // 2`, double buffering); wide axes are walked in sub-tiles.
- Tail (last) axes of loads/stores are whole rows of 32-byte multiples where the model's shapes
  allow it; no fp64, no unsigned types, no fp8 in kernels; `tl.dot` only on fp16/bf16/fp32
  with fp32 accumulation; no int64 atomics; no libdevice.
- The same source runs in upstream Triton's interpreter on CPU tensors (TRITON_INTERPRET=1:
  CI numerics against `backends.reference`) and lowers through triton-ascend + BiShengIR
  (`python -m backends.ascend.lowering`: Ascend-legality). Every kernel module lists what the
  lowering check compiles in `LOWERING_CASES`.
"""

from __future__ import annotations

KERNEL_MODULES = ("common", "attention", "indexer", "compress", "mhc", "gate")  # common: backends/triton_common.py


def lowering_cases():
    """Every (module, LoweringCase) the lowering check compiles, gathered from the kernel modules."""
    import importlib

    cases = []
    for name in KERNEL_MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # module not written yet
            raise
        cases += list(getattr(mod, "LOWERING_CASES", ()))
    return cases
