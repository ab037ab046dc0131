"""Ascend backend (torch_npu / CANN ops and Triton-Ascend kernels).

torch_npu is never imported here at module level: installed without CANN it breaks even
`import torch`. The probe only looks for the packages and says what is missing.
"""

from __future__ import annotations

import importlib.util
import os


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # an import hook that refuses the package counts as absent
        return False


def probe():
    from backends import BackendInfo

    reasons = []
    if not _installed("torch_npu"):
        reasons.append("torch_npu is not installed (pip install 'dsv4[ascend]' on a machine with CANN 8.5+)")
    if not os.environ.get("ASCEND_HOME_PATH") and not os.environ.get("ASCEND_TOOLKIT_HOME"):
        reasons.append("CANN is not set up (source /usr/local/Ascend/ascend-toolkit/set_env.sh)")
    reasons.append("the Ascend ops are not implemented in this release yet; use --backend reference")
    return BackendInfo("ascend", "npu", False, "; ".join(reasons), frozenset(), (), ())


def make_ops(device=None):
    from v4.errors import BackendUnavailable

    raise BackendUnavailable(probe().reason)
