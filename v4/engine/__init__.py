"""The continuous-batching engine (nano-vllm's `engine/` shape, vLLM v1's scheduling rule):

- `sequence`: one request's tokens and state;  `sampling_params`: how it samples;
- `block_manager`: which sequence holds which cache slot and pool blocks;
- `scheduler`: one token budget per step, running first, then waiting FCFS, preemption by recompute;
- `runner`: the model call over the persistent cache (eager, or decode graphs);
- `sampler`: next tokens and logprobs, per-request generators;
- `llm`: `LLM.add_request / step / abort / has_unfinished / generate`.
"""

from .llm import LLM, Completion, EngineStats
from .runner import DECODE_LABEL, graph_mode
from .sampler import sample
from .sampling_params import SamplingParams
from .sequence import FinishReason, RequestOutput, Sequence, SequenceStatus, TokenLogprobs

__all__ = ["LLM", "Completion", "EngineStats", "SamplingParams", "Sequence", "SequenceStatus", "FinishReason",
           "RequestOutput", "TokenLogprobs", "sample", "graph_mode", "DECODE_LABEL"]
