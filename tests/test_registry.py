"""Backend registry, runtime selection, model-config validation, YaRN frequencies, lazy imports.

Expected values come from design.md (registry rules) and spec/v4-architecture.md (§1.1 config,
§2.4 YaRN), computed by hand in the tests, never read back from our own output.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import backends
from backends.reference.ops import ReferenceOps
from v4.config import CSA, HCA, SLIDING, ModelConfig, RuntimeConfig, build_runtime, yarn_inv_freq
from v4.errors import BackendUnavailable, ConfigError

pytestmark = pytest.mark.usefixtures("no_triton_interpreter")

REPO = Path(__file__).resolve().parent.parent
KNOWN = ("reference", "cuda", "ascend")

HAVE_CUDA = importlib.util.find_spec("triton") is not None and torch.cuda.is_available()
HAVE_NPU = importlib.util.find_spec("torch_npu") is not None


# ----------------------------------------------------------------------------- registry


def test_op_set_is_the_design_table():
    # design.md "The seam: ops", in table order
    assert backends.OP_NAMES == (
        "rms_norm", "rope", "hc_pre", "hc_post", "hc_head", "compress", "indexer_topk",
        "attention", "moe_gate", "moe_experts", "linear", "grouped_out_proj",
    )
    assert set(KNOWN) <= set(backends.names())


def test_reference_available_with_every_op():
    info = backends.probe("reference")
    assert info.name == "reference"
    assert info.available is True
    assert info.reason == ""
    assert set(info.ops) == set(backends.OP_NAMES)
    assert {"plain", "exact"} <= set(info.modes)
    assert {"float32", "float64"} <= set(info.dtypes)


def test_reference_bundle_has_every_op_and_no_fallback():
    ops = backends.get_ops("reference", "cpu")
    for op in backends.OP_NAMES:
        assert callable(getattr(ops, op)), op
    assert ops.fallback == ()
    assert ops.impl == {op: "reference" for op in backends.OP_NAMES}
    assert str(ops.device) == "cpu"


@pytest.mark.skipif(HAVE_CUDA, reason="this machine has triton and a CUDA GPU")
def test_cuda_unavailable_says_what_to_install():
    info = backends.probe("cuda")
    assert info.available is False
    assert info.reason.strip()
    assert "install" in info.reason.lower()


def test_cuda_probe_names_the_triton_it_needs(monkeypatch):
    from backends import cuda

    assert cuda.triton_version_reason("3.6.0") is None and cuda.triton_version_reason("3.9.0") is None
    assert cuda.triton_version_reason("4.0.1+git1234") is None
    why = cuda.triton_version_reason("3.2.0")
    assert why == "triton 3.2.0 is older than the 3.6 the cuda backend's kernels need (pip install 'triton>=3.6')"
    import triton

    monkeypatch.setattr(triton, "__version__", "3.1.0")
    info = backends.probe("cuda")
    assert info.available is False and info.reason.startswith("triton 3.1.0 is older than the 3.6")


@pytest.mark.skipif(HAVE_NPU, reason="torch_npu is installed here")
def test_ascend_unavailable_says_what_to_install():
    info = backends.probe("ascend")
    assert info.available is False
    assert "torch_npu" in info.reason
    assert "install" in info.reason.lower()


@pytest.mark.skipif(HAVE_CUDA, reason="this machine has triton and a CUDA GPU")
@pytest.mark.parametrize("allow_fallback", [False, True])
def test_asking_for_unavailable_backend_raises_never_falls_back(allow_fallback):
    # allow_fallback fills missing *ops*; it must never replace a whole unavailable backend
    with pytest.raises(BackendUnavailable) as ei:
        backends.get_ops("cuda", allow_fallback=allow_fallback)
    msg = str(ei.value)
    assert "cuda" in msg
    assert backends.probe("cuda").reason in msg


@pytest.mark.skipif(HAVE_NPU, reason="torch_npu is installed here")
def test_asking_for_ascend_raises():
    with pytest.raises(BackendUnavailable, match="ascend"):
        backends.get_ops("ascend", allow_fallback=True)


@pytest.mark.skipif(HAVE_CUDA or HAVE_NPU, reason="an accelerator backend could be available here")
def test_auto_resolves_to_reference_here():
    assert backends.resolve("auto") == "reference"
    assert backends.get_ops("auto").impl["attention"] == "reference"


@pytest.mark.parametrize("call", [backends.probe, backends.resolve, backends.get_ops])
def test_unknown_backend_lists_valid_names(call):
    with pytest.raises(BackendUnavailable) as ei:
        call("tpu")
    msg = str(ei.value)
    assert "tpu" in msg
    for n in KNOWN + ("auto",):
        assert n in msg


def test_unknown_backend_in_runtime_config_lists_valid_names():
    with pytest.raises(ConfigError) as ei:
        build_runtime({"backend": "tpu"}, env={})
    msg = str(ei.value)
    assert "backend" in msg
    for n in KNOWN + ("auto",):
        assert n in msg
    with pytest.raises(ConfigError, match="backend"):
        build_runtime({}, env={"DSV4_BACKEND": "tpu"})


def test_format_matrix_lists_every_op_and_reasons():
    txt = backends.format_matrix()
    for op in backends.OP_NAMES:
        assert op in txt
    for n in KNOWN:
        assert n in txt
    for n in ("cuda", "ascend"):
        info = backends.probe(n)
        if not info.available:
            assert f"{n}: unavailable: {info.reason}" in txt


# ----------------------------------------------------------------------------- backend options


def test_each_backend_declares_its_options_with_make_ops_defaults():
    """OPTIONS are make_ops' keyword arguments, with the same defaults; probe() carries them whether
    or not the backend can run here, and the matrix lists them."""
    import inspect

    for name in KNOWN:
        mod = importlib.import_module(backends._REGISTRY[name].module)
        params = inspect.signature(mod.make_ops).parameters
        declared = backends.declared_options(name)
        for opt in declared:
            assert params[opt.name].default == opt.default, (name, opt.name)
            assert opt.problem(opt.default) is None
        assert backends.probe(name).options == declared
    assert [o.name for o in backends.declared_options("ascend")] == ["weights"]
    assert backends.declared_options("cuda") == () and backends.declared_options("reference") == ()
    assert "ascend.weights = dequant|w8a8 (default dequant; --ascend-weights)" in backends.format_matrix()


@pytest.mark.parametrize("options,needle", [
    ({"cuda": {"weights": "w8a8"}}, "backend 'cuda' has no option 'weights' (it declares: none)"),
    ({"gpu": {}}, "unknown backend 'gpu'; backends: reference, cuda, ascend"),
    ({"ascend": {"weights": "int4"}},
     "'runtime.backend_options.ascend.weights' must be one of dequant, w8a8, got 'int4'"),
    ({"ascend": "w8a8"}, "'runtime.backend_options.ascend' must be a mapping"),
    ("ascend=w8a8", "'runtime.backend_options' must be a mapping"),
])
def test_backend_options_are_checked_against_the_declarations(options, needle):
    with pytest.raises(ConfigError) as ei:
        build_runtime({"backend_options": options}, env={})
    assert needle in str(ei.value)


def _install_option_backend(monkeypatch):
    """A registered backend that declares one option (`tile`); make_ops records what it got."""
    got = []
    mod = types.ModuleType("dsv4_test_option_backend")
    mod.OPTIONS = (backends.BackendOption("tile", "64", ("64", "128"), "tile size"),)
    mod.probe = lambda: backends.BackendInfo("tiles", "cpu", True, "", frozenset(backends.OP_NAMES),
                                             ("float32",), ("plain",))

    def make_ops(device=None, tile="64"):
        got.append(tile)
        return ReferenceOps(device or "cpu")

    mod.make_ops = make_ops
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(backends._REGISTRY, "tiles", backends._Entry(mod.__name__))
    return got


def test_option_flags_are_generated_from_the_declarations(monkeypatch):
    """A backend's declared option becomes a flag of `dsv4 generate / serve / info` and of `dsv4 parity
    record / run`, overrides runtime.backend_options, and reaches that backend's make_ops only."""
    from v4 import cli

    got = _install_option_backend(monkeypatch)
    parser = cli.build_parser()
    a = parser.parse_args(["generate", "--config", "tiny", "--tiles-tile", "128", "--ids", "1"])
    over = cli._overrides(a)
    assert over["backend_options"] == {"tiles": {"tile": "128"}}
    rt = build_runtime({"backend_options": {"tiles": {"tile": "64"}, "ascend": {"weights": "w8a8"}}}, over, env={})
    assert rt.backend_options == {"tiles": {"tile": "128"}, "ascend": {"weights": "w8a8"}}
    backends.get_ops("tiles", backend_options=rt.backend_options)
    assert got == ["128"]
    assert cli._overrides(parser.parse_args(["generate", "--config", "tiny", "--ids", "1"]))["backend_options"] is None
    for argv in (["parity", "record", "--suite", "smoke", "--out", "x", "--tiles-tile", "128"],
                 ["parity", "run", "--tiles-tile", "128"], ["info", "--tiles-tile", "128"]):
        assert getattr(parser.parse_args(argv), "backend_option__tiles__tile") == "128"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--tiles-tile", "32"])


# ----------------------------------------------------------------------------- selection precedence


def test_selection_precedence_config_cli_env():
    cfg, cli = {"backend": "reference"}, {"backend": "cuda"}
    assert build_runtime(cfg, cli, env={"DSV4_BACKEND": "ascend"}).backend == "ascend"
    assert build_runtime(cfg, cli, env={}).backend == "cuda"
    assert build_runtime(cfg, {"backend": None}, env={}).backend == "reference"
    assert build_runtime(cfg, None, env={"DSV4_BACKEND": "ascend"}).backend == "ascend"
    assert build_runtime({}, None, env={}).backend == "auto"  # the documented default
    # other fields: CLI overrides the file, the file overrides the defaults
    rt = build_runtime({"dtype": "bfloat16", "max_num_seqs": 3}, {"dtype": "float64", "mode": None}, env={})
    assert (rt.dtype, rt.mode, rt.max_num_seqs) == ("float64", "plain", 3)


def test_selection_reads_process_environment(monkeypatch):
    monkeypatch.setenv("DSV4_BACKEND", "ascend")
    assert build_runtime({"backend": "reference"}, {"backend": "cuda"}).backend == "ascend"
    from v4.runtime import resolve

    _, rt = resolve(None, "tiny", None, {"backend": "reference"})
    assert rt.backend == "ascend"


@pytest.mark.parametrize(
    "field,value",
    [("dtype", "int8"), ("mode", "fast"), ("max_num_seqs", 0), ("max_model_len", -5), ("block_size", 0),
     ("prefill_chunk", -1), ("max_num_seqs", True), ("max_num_batched_tokens", 0), ("kv_cache_memory", "lots"),
     ("kv_cache_memory", -1), ("backend", "gpu")],
)
def test_invalid_runtime_field_names_the_field(field, value):
    with pytest.raises(ConfigError) as ei:
        build_runtime({field: value}, env={})
    assert field in str(ei.value)
    with pytest.raises(ConfigError, match=field):
        RuntimeConfig.from_dict({field: value})


@pytest.mark.parametrize("old,new", [("max_batch", "max_num_seqs"), ("max_seq_len", "max_model_len")])
def test_renamed_runtime_fields_say_the_new_name(old, new):
    with pytest.raises(ConfigError, match=f"'runtime.{old}' is now 'runtime.{new}'"):
        build_runtime({old: 8}, env={})


@pytest.mark.parametrize("value,nbytes", [(4096, 4096), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9),
                                          ("1.5GiB", 3 * 2**29), ("100 kib", 102400)])
def test_kv_cache_memory_takes_bytes_or_units(value, nbytes):
    assert build_runtime({"kv_cache_memory": value}, env={}).kv_cache_bytes == nbytes


def test_unknown_runtime_key_is_named():
    with pytest.raises(ConfigError) as ei:
        build_runtime({"backend": "reference", "turbo": True}, env={})
    assert "turbo" in str(ei.value)


# ----------------------------------------------------------------------------- a fake backend


def _install_fake(monkeypatch, declared=("rms_norm", "attention"), modes=("plain",), dtypes=("float32",)):
    """Register a backend module 'fake' that implements only `declared` (delegating to reference)."""
    calls = {op: 0 for op in declared}
    ref = ReferenceOps("cpu")

    class FakeOps:
        name = "fake"
        device = torch.device("cpu")

    def _wrap(op):
        fn = getattr(ref, op)

        def impl(*a, **kw):
            calls[op] += 1
            return fn(*a, **kw)

        impl.fake = True
        return impl

    def make_ops(device=None):
        o = FakeOps()
        for op in declared:
            setattr(o, op, _wrap(op))
        if "linear" in declared:  # the weight layout its own `linear` consumes
            o.prepare_linear = ref.prepare_linear
        return o

    def probe():
        return backends.BackendInfo("fake", "cpu", True, "", frozenset(declared), dtypes, modes)

    mod = types.ModuleType("dsv4_test_fake_backend")
    mod.probe, mod.make_ops = probe, make_ops
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(backends._REGISTRY, "fake", backends._Entry(mod.__name__))
    return calls


def test_fake_backend_missing_ops_refused_without_fallback(monkeypatch):
    _install_fake(monkeypatch)
    with pytest.raises(BackendUnavailable) as ei:
        backends.get_ops("fake", "cpu")
    msg = str(ei.value)
    assert "fake" in msg and "allow_fallback" in msg
    for op in ("rope", "compress", "moe_experts"):
        assert op in msg
    assert "rms_norm" not in msg.split("does not implement")[-1].split(";")[0]


def test_fake_backend_fallback_fills_and_reports(monkeypatch):
    _install_fake(monkeypatch)
    ops = backends.get_ops("fake", "cpu", allow_fallback=True)
    missing = tuple(op for op in backends.OP_NAMES if op not in ("rms_norm", "attention"))
    assert ops.fallback == missing
    assert ops.impl["rms_norm"] == "fake" and ops.impl["attention"] == "fake"
    assert all(ops.impl[op] == "reference" for op in missing)
    assert getattr(ops.rms_norm, "fake", False) and getattr(ops.attention, "fake", False)
    for op in missing:
        fn = getattr(ops, op)
        assert isinstance(getattr(fn, "__self__", None), ReferenceOps), op
    # unsupported mode / dtype of the fake are refused, not silently run elsewhere
    with pytest.raises(BackendUnavailable, match="exact"):
        backends.get_ops("fake", "cpu", allow_fallback=True, mode="exact")
    with pytest.raises(BackendUnavailable, match="float64"):
        backends.get_ops("fake", "cpu", allow_fallback=True, dtype="float64")
    # the fake shows up in the registry listing and the matrix
    assert "fake" in backends.names()
    assert "fake" in backends.format_matrix()


def _tiny_model(ops):
    from v4.config import load_config_file
    from v4.model import Transformer
    from v4.runtime import random_weights

    cfg, _ = load_config_file("tiny")
    return Transformer(cfg, random_weights(cfg, 0), ops, torch.float32, "plain")


@pytest.mark.parametrize("declared", [("rms_norm", "attention"), ("rms_norm",)])
def test_model_runs_on_partial_backend_with_fallback(monkeypatch, declared):
    """A partial backend + reference fill computes the same logits as the reference backend."""
    calls = _install_fake(monkeypatch, declared=declared)
    ops = backends.get_ops("fake", "cpu", allow_fallback=True)
    ids = [5, 6, 7, 8, 9]
    got = _tiny_model(ops).logits(ids)
    want = _tiny_model(backends.get_ops("reference", "cpu")).logits(ids)
    assert all(calls[op] > 0 for op in declared), calls
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- model config

FLASH_RATIOS = [0, 0] + [4, 128] * 20 + [4] + [0]


def flash_config_json() -> dict:
    """The official V4-Flash config.json, written from spec §1.1 (launch dump: no expert_dtype)."""
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "torch_dtype": "bfloat16",
        "vocab_size": 129280,
        "hidden_size": 4096,
        "num_hidden_layers": 43,
        "num_attention_heads": 64,
        "num_key_value_heads": 1,
        "head_dim": 512,
        "qk_rope_head_dim": 64,
        "q_lora_rank": 1024,
        "o_groups": 8,
        "o_lora_rank": 1024,
        "sliding_window": 128,
        "compress_ratios": FLASH_RATIOS,
        "compress_rope_theta": 160000,
        "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        "max_position_embeddings": 1048576,
        "index_n_heads": 64,
        "index_head_dim": 128,
        "index_topk": 512,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 6,
        "moe_intermediate_size": 2048,
        "num_hash_layers": 3,
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5,
        "swiglu_limit": 10.0,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6,
        "rms_norm_eps": 1e-6,
        "num_nextn_predict_layers": 1,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    }


def test_official_flash_config_loads():
    assert len(FLASH_RATIOS) == 44
    cfg = ModelConfig.from_dict(flash_config_json())
    types_ = cfg.layer_types
    assert len(types_) == 43
    assert (types_.count(SLIDING), types_.count(CSA), types_.count(HCA)) == (2, 21, 20)
    # spec §1.1: sliding layers 0,1; CSA even 2..42; HCA odd 3..41
    assert [i for i, t in enumerate(types_) if t == SLIDING] == [0, 1]
    assert [i for i, t in enumerate(types_) if t == CSA] == list(range(2, 43, 2))
    assert [i for i, t in enumerate(types_) if t == HCA] == list(range(3, 42, 2))
    assert cfg.layer_ratio(43) == 0 and cfg.layer_type(43) == SLIDING  # the MTP block
    assert cfg.hca_ratio == 128
    assert cfg.nope_head_dim == 448


def test_official_pro_ratios_layer_counts():
    d = flash_config_json()
    d.update(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, o_groups=16,
             compress_ratios=[128, 128] + [4, 128] * 29 + [4] + [0], index_topk=1024, n_routed_experts=384,
             moe_intermediate_size=3072, routed_scaling_factor=2.5)
    cfg = ModelConfig.from_dict(d)
    t = cfg.layer_types
    assert (t.count(SLIDING), t.count(CSA), t.count(HCA)) == (0, 30, 31)


def test_official_config_json_file_loads(tmp_path):
    import json

    from v4.config import load_config_file

    ck = tmp_path / "DeepSeek-V4-Flash"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps(flash_config_json()))
    cfg, rt = load_config_file(str(ck))
    assert rt == {}
    assert cfg.name == "DeepSeek-V4-Flash"
    assert cfg.num_hidden_layers == 43 and cfg.compress_ratios == FLASH_RATIOS


@pytest.mark.parametrize(
    "field,value",
    [
        ("o_groups", 5),  # 64 heads are not divisible by 5
        ("compress_ratios", [0, 4, 128]),  # needs 43 + 1 entries
        ("hidden_size", -4096),
        ("num_key_value_heads", 2),
        ("num_attention_heads", 0),
        ("qk_rope_head_dim", 63),
        ("num_experts_per_tok", 300),  # > 256 experts
        ("scoring_func", "softmax"),
        ("tie_word_embeddings", True),
        ("rope_scaling", {"type": "linear", "factor": 4}),
        ("vocab_size", 1.5),
    ],
)
def test_bad_model_field_is_named(field, value):
    d = flash_config_json()
    d[field] = value
    with pytest.raises(ConfigError) as ei:
        ModelConfig.from_dict(d, source="my-config.json")
    msg = str(ei.value)
    assert field in msg
    assert "my-config.json" in msg


def test_mtp_ratio_must_be_zero():
    d = flash_config_json()
    d["compress_ratios"] = FLASH_RATIOS[:-1] + [4]
    with pytest.raises(ConfigError, match="compress_ratios"):
        ModelConfig.from_dict(d)


def test_unknown_model_key_is_named():
    d = flash_config_json()
    d["num_experts_per_token"] = 6  # a typo of num_experts_per_tok
    with pytest.raises(ConfigError, match="num_experts_per_token"):
        ModelConfig.from_dict(d)


# ----------------------------------------------------------------------------- YaRN (spec §2.4)


def _base_freqs(dim: int, base: float) -> list[float]:
    return [base ** (-2 * i / dim) for i in range(dim // 2)]


def test_yarn_inv_freq_matches_hand_formula():
    rs = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}
    got = yarn_inv_freq(64, 160000.0, rs)
    # spec §2.4: for rope dim 64, base 160000, L0 65536, beta 32 / 1: lo = 15, hi = 25
    lo, hi, factor = 15, 25, 16
    want = []
    for i, f in enumerate(_base_freqs(64, 160000.0)):
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        want.append(f * ramp / factor + f * (1 - ramp))
    assert got.shape == (32,)
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    # sanity on the two ends: untouched high frequencies, fully interpolated low frequencies
    f = _base_freqs(64, 160000.0)
    assert math.isclose(float(got[0]), f[0], rel_tol=1e-12)
    assert math.isclose(float(got[14]), f[14], rel_tol=1e-12)
    assert math.isclose(float(got[25]), f[25] / 16, rel_tol=1e-12)
    assert math.isclose(float(got[31]), f[31] / 16, rel_tol=1e-12)


def test_yarn_bounds_from_spec_formula():
    # the lo / hi the spec quotes follow from its own formula
    d, base, L0 = 64, 160000.0, 65536
    lo = max(math.floor(d * math.log(L0 / (32 * 2 * math.pi)) / (2 * math.log(base))), 0)
    hi = min(math.ceil(d * math.log(L0 / (1 * 2 * math.pi)) / (2 * math.log(base))), d - 1)
    assert (lo, hi) == (15, 25)


def test_plain_rope_inv_freq():
    got = yarn_inv_freq(64, 10000.0, None)
    want = torch.tensor(_base_freqs(64, 10000.0), dtype=torch.float64)
    assert torch.allclose(got.double(), want, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- lazy imports

_LAZY_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = ("triton", "torch_npu")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, Block())
    import v4, v4.model, v4.cli, backends, backends.reference
    import backends.cuda, backends.ascend
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print(backends.format_matrix())
    print("CUDA_AVAILABLE", backends.probe("cuda").available)
    print("ASCEND_AVAILABLE", backends.probe("ascend").available)
    print("RESOLVED", backends.resolve("auto"))
    """
)


def test_imports_work_without_triton_and_torch_npu():
    env = {k: v for k, v in os.environ.items() if k != "DSV4_BACKEND"} | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _LAZY_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "CUDA_AVAILABLE False" in out
    assert "ASCEND_AVAILABLE False" in out
    assert "RESOLVED reference" in out
    assert "cuda: unavailable:" in out and "ascend: unavailable:" in out
    assert "triton is not installed" in out
    assert "torch_npu is not installed" in out
    for op in backends.OP_NAMES:
        assert op in out


def test_weight_ops_fall_back_together(monkeypatch):
    """A backend's `linear` consumes its own weight form: if moe_experts or grouped_out_proj come
    from reference, linear and the prepare hooks must come from reference as well."""
    _install_fake(monkeypatch, declared=("rms_norm", "linear"))
    ops = backends.get_ops("fake", "cpu", allow_fallback=True)
    assert ops.impl["linear"] == "reference" and "linear" in ops.fallback
    assert isinstance(ops.prepare_linear.__self__, ReferenceOps)
    assert isinstance(ops.prepare_experts.__self__, ReferenceOps)
