"""dsv4 model core: device-agnostic DeepSeek V4.

Nothing here imports triton or torch_npu; kernels come in through the ``ops`` object that
``backends.get_ops`` hands to the model.
"""

__version__ = "0.1.0"
