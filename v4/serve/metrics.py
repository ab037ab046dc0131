"""Prometheus metrics under vLLM's names (serving.md §1.6), so dashboards and `vllm bench serve` work.

Every metric carries vLLM's labels `model_name` and `engine` (the data-parallel engine index; "0").
Gauges and token counters follow the engine after every step; request latencies are observed by
the HTTP handlers, which see a request's whole life (TTFT starts when the HTTP request arrives).
Each server owns its registry, so several apps can live in one process (tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .async_engine import EngineSnapshot

# vLLM's bucket edges (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    def __init__(self, model_name: str, engine_index: int = 0):
        self.registry = CollectorRegistry()
        labels = ["model_name", "engine"]
        self._values = (model_name, str(engine_index))
        r = self.registry

        def gauge(name, doc):
            return Gauge(name, doc, labels, registry=r).labels(*self._values)

        def counter(name, doc):
            return Counter(name, doc, labels, registry=r).labels(*self._values)

        def hist(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(*self._values)

        self.running = gauge("vllm:num_requests_running", "Requests in the model's running batch.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled (preempted ones included).")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage: 1 means full (a fraction, as vLLM's).")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        self.preemptions = counter("vllm:num_preemptions", "Preemptions (by recompute).")
        self._success = Counter("vllm:request_success", "Finished requests, by finish reason.",
                                labels + ["finished_reason"], registry=r)
        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Time between tokens of a request.", ITL_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Request latency, arrival to last token.", REQUEST_BUCKETS)
        self.queue = hist("vllm:request_queue_time_seconds", "Time from engine arrival to first scheduled.",
                          REQUEST_BUCKETS)
        self.spec_drafts = counter(
            "vllm:spec_decode_num_drafts", "Speculative verifications (one per sequence and step)."
        )
        self.spec_draft_tokens = counter("vllm:spec_decode_num_draft_tokens", "Draft tokens proposed and verified.")
        self.spec_accepted = counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self._spec_per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                                     "Draft tokens accepted, by position in the draft (0 = first).",
                                     labels + ["position"], registry=r)
        self._seen = EngineSnapshot()

    def on_step(self, snap: EngineSnapshot, _outputs=None) -> None:
        """Engine thread, after every step: gauges, and the counters' increments since the last step."""
        self.running.set(snap.running)
        self.waiting.set(snap.waiting)
        self.kv_usage.set(snap.kv_cache_usage)
        for counter, field in ((self.prompt_tokens, "prompt_tokens"), (self.generation_tokens, "generation_tokens"),
                               (self.preemptions, "num_preemptions"), (self.spec_drafts, "spec_num_drafts"),
                               (self.spec_draft_tokens, "spec_num_draft_tokens"),
                               (self.spec_accepted, "spec_num_accepted_tokens")):
            delta = getattr(snap, field) - getattr(self._seen, field)
            if delta > 0:
                counter.inc(delta)
            setattr(self._seen, field, getattr(snap, field))
        seen = self._seen.spec_accepted_per_pos
        for pos, n in enumerate(snap.spec_accepted_per_pos):
            delta = n - (seen[pos] if pos < len(seen) else 0)
            if delta > 0:
                self._spec_per_pos.labels(*self._values, str(pos)).inc(delta)
        self._seen.spec_accepted_per_pos = snap.spec_accepted_per_pos

    def finished(self, reason: str) -> None:
        self._success.labels(*self._values, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
