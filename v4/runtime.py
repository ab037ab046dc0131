"""Put a model together: config + runtime selection + weights + backend ops."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import (GRAPH_SETTINGS, ConfigDeprecationWarning, ModelConfig, RuntimeConfig, build_runtime,
                     load_config_file)
from .errors import ConfigError, InputError
from .model import Transformer
from .tokenizer import load_tokenizer

log = logging.getLogger("dsv4")

# The model every command uses when given neither --checkpoint nor --config: the trained tiny V4
# shipped inside the package (found from the package, not the working directory, so an installed
# dsv4 finds it too). Random-weight models stay one flag away: --config tiny.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "embedded" / "tiny-v4"
DEFAULT_MODEL_NOTE = (f"no --checkpoint or --config: using the trained tiny-v4 ({DEFAULT_CHECKPOINT}); "
                      "--config tiny for seeded random weights")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class Loaded:
    model: Transformer
    cfg: ModelConfig
    runtime: RuntimeConfig
    tokenizer: object
    checkpoint: str | None


def resolve(checkpoint: str | None, config: str | None, runtime_file: str | None = None,
            overrides: dict | None = None) -> tuple[ModelConfig, RuntimeConfig]:
    """Model config from the checkpoint or --config (neither: the shipped tiny-v4 checkpoint);
    runtime from the YAMLs, then CLI, then env."""
    checkpoint = default_checkpoint(checkpoint, config)
    cfg, rt = None, {}
    if config is not None:
        cfg, rt = load_config_file(config)
    if runtime_file is not None:
        _, rt2 = load_config_file(runtime_file)
        rt.update(rt2)
    if checkpoint is not None:
        p = Path(checkpoint)
        if not (p / "config.json").is_file():
            raise ConfigError(f"{p}: no config.json; a checkpoint directory holds config.json and *.safetensors")
        ck_cfg, _ = load_config_file(str(p / "config.json"))
        cfg = ck_cfg if cfg is None else cfg
    if cfg is None:
        raise ConfigError(
            f"{config}: this file has no 'model:' section; pass a model config (tiny, small, v4-flash, ...) "
            "or --checkpoint"
        )
    return cfg, build_runtime(rt, overrides)


def load(checkpoint: str | None = None, config: str | None = None, runtime_file: str | None = None,
         overrides: dict | None = None, seed: int = 0, progress: bool = True) -> Loaded:
    import backends
    from . import weights

    checkpoint = default_checkpoint(checkpoint, config)
    cfg, rt = resolve(checkpoint, config, runtime_file, overrides)
    ops = backends.get_ops(rt.backend, rt.device, rt.allow_fallback, rt.mode, rt.dtype, rt.backend_options)
    if checkpoint is not None:
        cfg, tensors = weights.load_checkpoint(checkpoint, cfg, progress=progress, device=ops.device)
    else:
        log.info("no checkpoint given: seeded random weights (seed %d) for config '%s'", seed, cfg.name)
        tensors = random_weights(cfg, seed)
    model = Transformer(cfg, tensors, ops, DTYPES[rt.dtype], rt.mode)
    return Loaded(model, cfg, rt, load_tokenizer(cfg, checkpoint), checkpoint)


def default_checkpoint(checkpoint: str | None, config: str | None) -> str | None:
    """The checkpoint to load: the given one; the shipped tiny-v4 when no model is named at all;
    None with --config alone (seeded random weights)."""
    if checkpoint is None and config is None:
        return str(DEFAULT_CHECKPOINT)
    return checkpoint


def random_weights(cfg: ModelConfig, seed: int = 0) -> dict:
    """The seeded fp32 weights `dsv4 init --quant fp32 --seed S` would write, built in memory."""
    from .weights import expected_tensors, init_tensor

    return {name: init_tensor(name, spec, cfg, seed) for name, spec in expected_tensors(cfg).items()}


# ------------------------------------------------------------------ runtime flags both command lines share
def add_runtime_flags(p, decode_help: str) -> None:
    """--decode-graphs (runtime.decode_graphs; its old name --cuda-graphs still works, with a
    deprecation warning) and one flag per option each backend declares (`--ascend-weights`, ...:
    `backends.add_option_flags`). Read back with `runtime_flag_overrides`."""
    import backends

    p.add_argument("--decode-graphs", choices=list(GRAPH_SETTINGS), help=decode_help)
    p.add_argument("--cuda-graphs", choices=list(GRAPH_SETTINGS), help="deprecated: use --decode-graphs")
    backends.add_option_flags(p)


def runtime_flag_overrides(a) -> dict:
    """{"decode_graphs": ..., "backend_options": {...}} from the flags of `add_runtime_flags` (None
    where unset). A namespace that still carries the old `ascend_weights` (a caller's own flag) passes
    it on as the deprecated runtime field."""
    import backends

    decode = getattr(a, "decode_graphs", None)
    old = getattr(a, "cuda_graphs", None)
    if old is not None:
        if decode is not None and decode != old:
            raise InputError(f"--cuda-graphs {old} and --decode-graphs {decode} disagree; give only --decode-graphs")
        warnings.warn(f"--cuda-graphs is deprecated; use --decode-graphs {old}", ConfigDeprecationWarning, stacklevel=2)
        decode = old
    over = {"decode_graphs": decode, "backend_options": backends.option_overrides(a) or None}
    if getattr(a, "ascend_weights", None) is not None:
        over["ascend_weights"] = a.ascend_weights
    return over
