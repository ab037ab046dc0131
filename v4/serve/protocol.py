"""Request bodies of the OpenAI-compatible API, with vLLM's field names and defaults (serving.md §1.2).

Pydantic checks types (its errors become 400s); ranges are checked by `SamplingParams.validate`,
whose messages name the field. Fields we accept but cannot honour are refused in `check_supported`
with a sentence, never silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from ..engine import SamplingParams
from .errors import RequestError

INT64 = 2**63 - 1
MAX_TOP_LOGPROBS = 20  # vLLM's default --max-logprobs


class StreamOptions(BaseModel):
    include_usage: bool = True  # once the object is present (vLLM)
    continuous_usage_stats: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as vLLM does (it logs them)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = Field(None, ge=-INT64 - 1, le=INT64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise RequestError(f"n must be 1 (dsv4 serve returns one choice per request), got {self.n}", "n")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed with stream=true", "stream_options")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise RequestError(f"{name} is not supported by dsv4 serve yet; leave it at 0", name)
        if self.repetition_penalty not in (None, 1.0):
            raise RequestError(
                "repetition_penalty is not supported by dsv4 serve yet; leave it at 1", "repetition_penalty"
            )
        if self.logit_bias:
            raise RequestError("logit_bias is not supported by dsv4 serve yet; leave it out", "logit_bias")

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """Unset fields take the API's defaults: temperature 1 and top_p 1 (V4's recommended settings)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
            min_p=self.min_p or 0.0, seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=stop,
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos, logprobs=logprobs)


class CompletionRequest(_Request):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise RequestError("suffix is not supported (as in vLLM); leave it out", "suffix")
        if self.best_of not in (None, 1):
            raise RequestError(f"best_of must be 1, got {self.best_of}", "best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}", "logprobs")
        if self.echo and self.logprobs is not None:
            raise RequestError("echo with logprobs needs prompt logprobs, which dsv4 serve does not compute yet; "
                             "drop one of them", "echo")


class ChatCompletionRequest(_Request):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: bool = True
    reasoning_effort: str | None = None
    include_reasoning: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                raise RequestError(
                    f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}", "top_logprobs"
                )
        if self.tool_choice not in (None, "none", "auto"):
            raise RequestError("tool_choice must be \"auto\" or \"none\": dsv4 serve has no constrained decoding for "
                             "\"required\" or a named tool", "tool_choice")
        if self.continue_final_message:
            raise RequestError("continue_final_message is not supported yet; leave it out", "continue_final_message")
        if not self.messages:
            raise RequestError("messages must hold at least one message", "messages")

    @property
    def thinking(self) -> bool:
        return thinking_mode(self.chat_template_kwargs, self.reasoning_effort)


def thinking_mode(chat_template_kwargs: dict | None, reasoning_effort: str | None) -> bool:
    """Thinking is on by default (V4); chat_template_kwargs.thinking / enable_thinking = false, or
    reasoning_effort = "none", select chat mode (vLLM sets both keys together, so either is honoured)."""
    kw = chat_template_kwargs or {}
    for key in ("thinking", "enable_thinking"):
        if key in kw:
            return bool(kw[key])
    return reasoning_effort != "none"


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (the format adds BOS)
    return_token_strs: bool = False
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[int]
