"""What every conformance test module shares: its pytest parameters (backend, case, dtype) over the one
case set, a case's inputs as a kernel gets them, and the device a backend's kernel runs on."""

import pytest
import torch

from backends.conformance import CASES, backends_of, kernel_args

GPU = torch.cuda.is_available()
_DT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def params(op: str) -> list:
    """(backend, case, dtype) for every case of the op in each of its dtypes, over each backend."""
    out = []
    for backend in backends_of(op):
        marks = [pytest.mark.gpu] if backend == "cuda" else []  # bench/gpu_check.sh runs these on a GPU
        for case in CASES[op]:
            for dt in case.dtypes:
                name = f"{backend}-{case.name}" + ("" if len(case.dtypes) == 1 else f",{_DT[dt]}")
                out.append(pytest.param(backend, case, dt, id=name, marks=marks))
    return out


def inputs(case, dtype) -> tuple[list, dict]:
    """The case's inputs as a kernel gets them in `dtype`: (args, kwargs)."""
    tagged, kwargs = case.inputs()
    return kernel_args(tagged, dtype), kwargs


def device_of(backend: str):
    """t -> t on the device the backend's kernel runs on (a GPU for cuda where there is one, else CPU)."""
    dev = "cuda" if backend == "cuda" and GPU else "cpu"
    return lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t


def f64(args) -> list:
    """The arguments with every floating tensor in float64 (the truth side's inputs)."""
    return [a.to(torch.float64) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
