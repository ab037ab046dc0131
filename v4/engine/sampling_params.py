"""Per-request sampling parameters, with vLLM's names and defaults where vLLM has them."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (vLLM's default is 1.0; dsv4 generate's is greedy)
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = no top-k cut
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability
    seed: int | None = None  # a generator of this request's own: same seed, same tokens, whatever shares the step
    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop_token_ids are suppressed until this many tokens are out
    stop: list[str] = field(default_factory=list)  # matched on the detokenised output, not emitted
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; N >= 0: the chosen token's logprob plus the top-N alternatives

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self, vocab_size: int | None = None) -> None:
        """One sentence naming the request parameter that is out of range."""
        def need(ok, name, what, value):
            if not ok:
                raise InputError(f"{name} must be {what}, got {value!r}")

        need(self.temperature >= 0, "temperature", ">= 0", self.temperature)
        need(0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        need(
            isinstance(self.top_k, int) and self.top_k >= -1,
            "top_k",
            "-1, 0 (no cut) or a positive integer",
            self.top_k,
        )
        need(0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        need(
            isinstance(self.max_tokens, int) and self.max_tokens >= 0,
            "max_tokens",
            "a non-negative integer",
            self.max_tokens,
        )
        need(
            isinstance(self.min_tokens, int) and 0 <= self.min_tokens,
            "min_tokens",
            "a non-negative integer",
            self.min_tokens,
        )
        need(self.min_tokens <= self.max_tokens, "min_tokens", f"<= max_tokens={self.max_tokens}", self.min_tokens)
        need(self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0), "logprobs",
             "None or a non-negative integer", self.logprobs)
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings", self.stop)
        if vocab_size is not None:
            need(
                self.logprobs is None or self.logprobs <= vocab_size,
                "logprobs",
                f"<= the vocabulary size {vocab_size}",
                self.logprobs,
            )
            bad = [t for t in self.stop_token_ids if not 0 <= int(t) < vocab_size]
            need(not bad, "stop_token_ids", f"ids in [0, {vocab_size})", bad)
