"""The whole model on the CUDA backend (Triton kernels; interpreter on CPU when there is no GPU)
against the reference backend on the same weights."""

import json

import pytest
import torch

import backends
from tests.conftest import rel_err, run_step
from v4.config import load_config_file
from v4.model import Transformer
from v4.runtime import random_weights

pytestmark = pytest.mark.gpu  # bench/gpu_check.sh runs these natively on a GPU


def _pair(mode="plain"):
    cfg, _ = load_config_file("tiny")
    cuda = backends.get_ops("cuda")  # every op native: no fallback allowed here
    assert cuda.fallback == ()
    ref = backends.get_ops("reference", str(cuda.device))
    mk = lambda ops: Transformer(cfg, random_weights(cfg, 4), ops, torch.float32, mode)  # noqa: E731
    return mk(ref), mk(cuda)


@pytest.mark.slow  # > 20 s on 2 CPU cores
def test_prefill_and_decode_match_reference_on_every_layer_type():
    ref, cuda = _pair()
    ids = torch.randint(3, 500, (41,), generator=torch.Generator().manual_seed(2))  # windows, CSA, HCA close
    want = ref.logits(ids).cpu()  # the reference runs on the cuda backend's device (the GPU, when there is one)
    assert rel_err(cuda.logits(ids).cpu(), want) < 1e-5
    cache = cuda.new_cache(1, 64)
    slot = cache.alloc()
    rows = [run_step(cuda, ids[:33], cache, [slot], [0], [33])[0]]
    for t in range(33, 41):
        rows.append(run_step(cuda, ids[t:t + 1], cache, [slot], [t], [1])[0])
    assert rel_err(torch.cat(rows).cpu(), want) < 1e-5


@pytest.mark.slow  # > 20 s on 2 CPU cores
def test_parity_run_reference_vs_cuda_passes_the_fp32_profile(capsys, tmp_path):
    from v4 import cli

    # the smoke suite (3 prompts, every hook point, 8 greedy tokens) in one packed batch; the cuda
    # side's greedy continuation goes through the captured-decode path (emulated without a GPU)
    code = cli.main(["parity", "run", "--config", "tiny", "--backends", "reference:fp64,cuda:fp32",
                     "--cuda-graphs", "on", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    summary = out.split("summary")[-1]
    assert "cuda/float32/plain" in summary and "PASS" in summary and "profile fp32" in summary
    decode = {json.loads(p.read_text())["backend"]["name"]: json.loads(p.read_text())["options"]["decode"]
              for p in tmp_path.rglob("bundle.json")}
    assert decode == {
        "reference": "eager",
        "cuda": "cuda graphs" if torch.cuda.is_available() else "graph path, emulated",
    }
