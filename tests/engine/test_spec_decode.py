"""MTP speculative decoding in the engine (issue 15), on the trained tiny-v4 and on random `tiny`, in float64.

What the tests hold speculative decoding to, each against something outside it:
- greedy: token for token what the engine gives without speculation (single, concurrent, preempted);
- the cache: after rejections it holds what a run without speculation holds, row by row;
- sampling: the distribution of the first two sampled tokens equals the exact one, computed from the
  model's own next-token probabilities (chi-square);
- the edge cases of serving.md §5: EOS inside the drafts, stop strings across a draft boundary,
  max_tokens inside the drafts, and mixed prefill + verify steps that feed the model only the
  sequences' own tokens.
The rejection sampler's own losslessness test, on a toy model, is tests/engine/test_rejection_sampler.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from v4.config import RuntimeConfig
from v4.engine import LLM, SamplingParams
from v4.errors import ConfigError

EMBEDDED = Path(__file__).resolve().parents[2] / "v4" / "embedded"


def _load(**kw):
    from v4.runtime import load

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DSV4_BACKEND", raising=False)
        return load(overrides={"backend": "reference", "dtype": "float64"}, progress=False, **kw)


@pytest.fixture(scope="module")
def trained():
    return _load(checkpoint=str(EMBEDDED / "tiny-v4"))


@pytest.fixture(scope="module")
def random_tiny():
    return _load(config="tiny")


@pytest.fixture(scope="module")
def heldout(trained):
    """Held-out prompts (text never trained on) as token ids, 24 to 60 tokens."""
    files = json.loads((EMBEDDED / "tiny-v4-heldout" / "sample.json").read_text())["files"]
    ids = [trained.tokenizer.encode(t) for t in files.values()]
    cuts = [(0, 0, 24), (1, 100, 40), (0, 300, 60), (2, 50, 33), (1, 500, 31), (0, 700, 45)]
    return [ids[f][off:off + n] for f, off, n in cuts]


def engine(loaded, k: int | None, **rt) -> LLM:
    base = dict(max_num_seqs=4, max_model_len=256, block_size=4, max_num_batched_tokens=128)
    base.update(rt)
    spec = None if k is None else {"method": "mtp", "num_speculative_tokens": k, **base.pop("spec_extra", {})}
    runtime = dataclasses.replace(loaded.runtime, **base, speculative_config=spec)
    return LLM(loaded.model, runtime, loaded.tokenizer)


GREEDY = SamplingParams(max_tokens=40, ignore_eos=True)


# ---------------------------------------------------------------------------- greedy: the same tokens
@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_tokens_equal_without_speculation_trained(trained, heldout, k):
    plain = [c.output_ids for c in engine(trained, None).generate(heldout, GREEDY)]
    llm = engine(trained, k)
    spec = [c.output_ids for c in llm.generate(heldout, GREEDY)]
    assert spec == plain
    st = llm.drafter.stats
    # the trained MTP block's drafts are accepted often, and rejected often: both paths ran
    assert 0 < st.num_accepted_tokens < st.num_draft_tokens
    assert st.num_draft_tokens >= st.num_drafts > 0


def test_greedy_tokens_equal_without_speculation_random_tiny(random_tiny):
    g = torch.Generator().manual_seed(5)
    prompts = [
        torch.randint(3, random_tiny.model.cfg.vocab_size, (n,), generator=g).tolist() for n in (1, 4, 15, 17, 33)
    ]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    plain = [c.output_ids for c in engine(random_tiny, None).generate(prompts, params)]
    for k in (1, 3):
        assert [c.output_ids for c in engine(random_tiny, k).generate(prompts, params)] == plain


def test_greedy_one_at_a_time_equals_concurrent(trained, heldout):
    alone = [engine(trained, 2, max_num_seqs=1).generate([p], GREEDY)[0].output_ids for p in heldout[:3]]
    together = [c.output_ids for c in engine(trained, 2, max_num_seqs=3).generate(heldout[:3], GREEDY)]
    assert together == alone


def test_greedy_under_preemption(trained, heldout):
    # a byte budget that holds about two sequences' pools: the scheduler must preempt (and drop drafts)
    from v4.cache import CacheGeometry

    cfg = trained.model.cfg
    geo = CacheGeometry.of(cfg, torch.float64, 4, cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
    budget = 4 * (geo.slot_bytes + sum(geo.block_bytes.values())) + int(geo.pool_bytes_per_token() * 150)
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    plain = [c.output_ids for c in engine(trained, None).generate(heldout[:4], params)]
    llm = engine(trained, 2, kv_cache_memory=budget)
    assert [c.output_ids for c in llm.generate(heldout[:4], params)] == plain
    assert llm.stats.num_preemptions > 0


# ---------------------------------------------------------------------------- no trace in the cache
def _slot_state(llm: LLM, slot: int, n: int) -> dict[str, torch.Tensor]:
    """Every cache row a sequence of n tokens can still read: its ring rows of the last W positions,
    its compressors' state rows (the open window's n mod m tokens; for the overlapping CSA compressor
    also the previous window) and its pool rows of the n // m complete entries. Rows past those are
    dead (overwritten before any read) and differ with step shapes even without speculation: a step
    that closes a window folds its new tokens into the entry without writing them to the state."""
    cache = llm.runner.cache
    W, bs = cache.cfg.sliding_window, cache.block_size
    out = {}
    for i, lc in enumerate(cache.layers):
        out[f"{i}.ring"] = lc.ring[slot, [p % W for p in range(max(0, n - W), n)]].clone()
        m = cache.cfg.layer_ratio(i)
        if not m:
            continue
        cur = m if lc.pool is not None and lc.index_pool is not None else 0  # CSA keeps the previous window first
        live = (list(range(m)) if cur and n >= m else []) + [cur + j for j in range(n % m)]
        entries = [cache.tables[m].owned[slot][e // bs] * bs + e % bs for e in range(n // m)]
        for name in ("state_kv", "state_score", "index_state_kv", "index_state_score"):
            t = getattr(lc, name)
            if t is not None:
                out[f"{i}.{name}"] = t[slot, live].clone()
        for name in ("pool", "index_pool"):
            t = getattr(lc, name)
            if t is not None:
                out[f"{i}.{name}"] = t.view(-1, t.shape[-1])[entries].clone()
    return out


def test_rejected_drafts_leave_no_trace_in_the_cache(trained, heldout):
    """After every speculative step, the sequence's cache rows (main layers) equal those of a run
    without speculation at the same length; the MTP layer's window ring equals its rows after one
    teacher-forced pass over the same tokens."""
    prompt = heldout[2]
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    spec, plain = engine(trained, 3, max_num_seqs=1), engine(trained, None, max_num_seqs=1)
    rid_s, rid_p = spec.add_request(prompt, params), plain.add_request(prompt, params)
    L = trained.model.cfg.num_hidden_layers
    checked = rejected_closes = 0
    while spec.has_unfinished():
        before = spec.drafter.stats.num_draft_tokens - spec.drafter.stats.num_accepted_tokens
        spec.step()
        if not spec.has_unfinished():
            break
        seq = spec.sequence(rid_s)
        n = seq.num_computed
        while plain.sequence(rid_p).num_computed < n:
            plain.step()
        assert plain.sequence(rid_p).num_computed == n
        a, b = _slot_state(spec, seq.slot, n), _slot_state(plain, plain.sequence(rid_p).slot, n)
        for name in b:
            if int(name.split(".")[0]) < L:  # the main stack; the plain run has no MTP pass
                assert torch.allclose(a[name], b[name], rtol=0, atol=1e-12), (n, name)
        checked += 1
        rejected_closes += (spec.drafter.stats.num_draft_tokens - spec.drafter.stats.num_accepted_tokens) > before
        # MTP layer: its ring holds MTP(h_t, x_t+1) for the last W positions t < n, as one pass over them gives
        ids = torch.tensor(seq.token_ids(0, n + 1))
        W = trained.model.cfg.sliding_window
        cache = trained.model.new_cache(1, n + 1)
        from v4.batch import StepBatch

        s = cache.alloc()
        batch = StepBatch([s], [0], [n], "cpu")
        cache.reserve_step(batch)
        trained.model.forward(ids[:n], batch, cache, "none", ids[1:n + 1])
        rows = [p % W for p in range(max(0, n - W), n)]
        ring = spec.runner.cache.layers[L].ring[seq.slot]
        assert torch.allclose(ring[rows], cache.layers[L].ring[s][rows], rtol=0, atol=1e-12), n
    assert checked > 10 and rejected_closes > 5


# ---------------------------------------------------------------------------- sampling: the same distribution
def _chi2_pvalue(observed: list[int], expected: list[float]) -> float:
    x = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    df = len(observed) - 1
    return float(
        torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2, dtype=torch.float64))
    )


def test_sampled_tokens_follow_the_models_distribution(trained, heldout):
    """Four tokens drawn with k = 2 (x1 from the prompt's step, x2 and x3 drafted and verified, x4
    the bonus or a later step's), top_k = 2, T = 1, against the exact product of the model's own
    top-2 next-token distributions along each path (cells with expected count < 5 merged)."""
    prompt = heldout[1][:20]
    model = trained.model

    def top2(ids):
        v, i = torch.softmax(model.logits(ids)[-1], -1).topk(2)
        return dict(zip(i.tolist(), (v / v.sum()).tolist()))

    exact = {(): 1.0}
    for _ in range(4):
        exact = {path + (x,): p * q for path, p in exact.items() for x, q in top2(prompt + list(path)).items()}
    N = 480
    params = [SamplingParams(max_tokens=4, temperature=1.0, top_k=2, seed=1000 + i, ignore_eos=True) for i in range(N)]
    llm = engine(trained, 2, max_num_seqs=8)
    counts = {}
    for c in llm.generate([prompt] * N, params):
        counts[tuple(c.output_ids)] = counts.get(tuple(c.output_ids), 0) + 1
    assert set(counts) <= set(exact)
    st = llm.drafter.stats
    assert st.num_drafts >= N and 0 < st.num_accepted_tokens < st.num_draft_tokens
    obs, exp = [], []
    for cell in sorted(exact, key=exact.get, reverse=True):  # the rarest cells merge into the last bin
        if exp and exp[-1] < 5 or (exp and N * exact[cell] < 5):
            obs[-1] += counts.get(cell, 0)
            exp[-1] += N * exact[cell]
        else:
            obs.append(counts.get(cell, 0))
            exp.append(N * exact[cell])
    assert len(obs) >= 6 and exp[-1] >= 5
    assert _chi2_pvalue(obs, exp) > 1e-3


def test_same_seed_same_tokens_with_speculation(trained, heldout):
    params = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=7)
    a = engine(trained, 2).generate(heldout[:2], params)
    b = engine(trained, 2, max_num_seqs=1).generate(heldout[:2], params)
    assert [c.output_ids for c in a] == [c.output_ids for c in b]


# ---------------------------------------------------------------------------- edge cases (serving.md §5)
def _multi_token_outputs(trained, prompt, k=3, max_tokens=40):
    """A greedy speculative run's outputs step by step: [(tokens before, new tokens)]."""
    llm = engine(trained, k, max_num_seqs=1)
    llm.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    steps, out = [], []
    while llm.has_unfinished():
        for o in llm.step():
            steps.append((list(out), list(o.new_token_ids)))
            out += o.new_token_ids
    return steps, out


def test_eos_inside_the_drafts_ends_the_stream(trained, heldout):
    prompt = heldout[0]
    steps, full = _multi_token_outputs(trained, prompt)
    # a token that first appears as an accepted draft (not the first token of its step)
    cands = [(before, new) for before, new in steps if len(new) >= 3 and new[1] not in before + new[:1]]
    assert cands, "no step accepted two drafts"
    before, new = cands[0]
    eos = new[1]
    llm = engine(trained, 3, max_num_seqs=1)
    llm.sampler.eos = eos  # this token is the end of the sequence for this engine
    outs = []
    llm.add_request(prompt, SamplingParams(max_tokens=40))
    while llm.has_unfinished():
        outs += llm.step()
    got = [t for o in outs for t in o.new_token_ids]
    assert got == before + new[:2]  # up to and including EOS, nothing after it
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    assert sum(o.finished for o in outs) == 1


def test_stop_string_across_a_draft_boundary(trained, heldout):
    prompt = heldout[3]
    tok = trained.tokenizer
    steps, full = _multi_token_outputs(trained, prompt)
    # a stop string whose first character comes from one step and the rest from the next
    for before, new in steps:
        a, b = tok.decode(before), tok.decode(before + new)
        if before and len(new) >= 2 and len(a) >= 1 and len(b) >= len(a) + 3:
            stop = b[len(a) - 1:len(a) + 3]
            if b.find(stop) == len(a) - 1 and stop.strip():
                break
    else:
        pytest.fail("no step boundary to straddle")
    plain = engine(trained, None).generate([prompt], SamplingParams(max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    llm = engine(trained, 3, max_num_seqs=1)
    rid = llm.add_request(prompt, SamplingParams(max_tokens=40, ignore_eos=True, stop=[stop]))
    text, outs = "", []
    while llm.has_unfinished():
        for o in llm.step():
            text += o.new_text
            outs.append(o)
    assert text == plain.text == b[:len(a) - 1]
    assert outs[-1].finish_reason == "stop" and rid == outs[-1].request_id


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5, 7, 10])
def test_max_tokens_inside_the_drafts(trained, heldout, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    plain = engine(trained, None).generate(heldout[:2], params)
    spec = engine(trained, 3).generate(heldout[:2], params)
    for p, s in zip(plain, spec):
        assert s.output_ids == p.output_ids and len(s.output_ids) == max_tokens
        assert s.finish_reason == "length"


def test_mixed_prefill_and_verify_steps_feed_only_the_sequences_tokens(trained, heldout):
    """A long prompt arriving while others verify drafts: every step's ids are exactly each
    sequence's own tokens (prompt + output) followed by its drafts; no BOS or EOS slips in."""
    llm = engine(trained, 2, max_num_seqs=3, prefill_chunk=16)
    fed = []
    orig = llm.runner._prepare

    def spy(step):
        batch, ids = orig(step)
        fed.append([(s.seq.id, s.start, s.num_tokens, s.num_drafts, list(s.seq.prompt_ids), list(s.seq.output_ids),
                     list(s.seq.draft_ids[:s.num_drafts])) for s in step] + [ids.tolist()])
        return batch, ids

    llm.runner._prepare = spy
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    llm.add_request(heldout[0], params)
    llm.add_request(heldout[1], params)
    for _ in range(4):
        llm.step()
    llm.add_request(heldout[2], params)  # 60 tokens: four chunks of 16, each beside the others' verifications
    while llm.has_unfinished():
        llm.step()
    mixed = 0
    cfg = trained.model.cfg
    for rec in fed:
        *seqs, ids = rec
        expect = []
        for _, start, n, nd, prompt, output, drafts in seqs:
            own = (prompt + output)[start:start + n - nd]
            assert len(own) == n - nd
            expect += own + drafts
        assert ids == expect
        has_chunk = any(start < len(prompt) for _, start, _, _, prompt, _, _ in seqs)
        mixed += has_chunk and any(nd > 0 for _, _, _, nd, _, _, _ in seqs)
        assert cfg.bos_token_id not in ids[1:] or cfg.bos_token_id in sum((p for *_, p, _, _ in seqs), [])
    assert mixed >= 2


# ---------------------------------------------------------------------------- switches
@pytest.mark.parametrize("value, needle", [
    ('{"method": "eagle"}', "method"),
    ('{"method": "mtp", "num_speculative_tokens": 4}', "num_speculative_tokens"),
    ('{"method": "mtp", "num_speculative_tokens": 0}', "num_speculative_tokens"),
    ("{mtp}", "not JSON"),
    ('{"method": "mtp", "k": 2}', "unknown key"),
    ('{"method": "mtp", "draft_sampling": "greedy"}', "draft_sampling"),
])
def test_bad_speculative_config_is_refused_with_one_sentence(value, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        RuntimeConfig(speculative_config=value).validate()
    assert "runtime.speculative_config" in str(e.value)


def test_model_without_mtp_is_refused(random_tiny):
    cfg = dataclasses.replace(random_tiny.model.cfg, num_nextn_predict_layers=0)
    model = type("M", (), {"cfg": cfg, "mtp": [], "device": torch.device("cpu")})()
    from v4.engine.spec_decode import MTPDrafter
    from v4.config import SpeculativeConfig

    with pytest.raises(ConfigError, match="no MTP block"):
        MTPDrafter(model, None, None, SpeculativeConfig())


# ---------------------------------------------------------------------------- the server
def test_server_with_speculative_decoding_answers_as_without_and_counts_drafts(trained):
    """A real `dsv4 serve --speculative-config` on 127.0.0.1: the openai client's greedy completion
    (plain and streamed) equals the engine's without speculation; /metrics carries vLLM's
    spec_decode counters, consistent with each other."""
    import re

    import httpx
    import openai

    from tests.serve_util import metric, server_process

    prompt = "def main("
    want = engine(trained, None).generate([trained.tokenizer.encode(prompt)],
                                          SamplingParams(max_tokens=24, ignore_eos=True))[0].text
    spec = json.dumps({"method": "mtp", "num_speculative_tokens": 2})
    with server_process("--dtype", "float64", "--speculative-config", spec, "--max-num-seqs", "2") as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", timeout=60, max_retries=0)
        got = client.completions.create(model="tiny-v4", prompt=prompt, max_tokens=24, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert got.choices[0].text == want
        chunks = client.completions.create(model="tiny-v4", prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in chunks) == want
        text = httpx.get(srv.url + "/metrics", timeout=30).text
    drafts = metric(text, "vllm:spec_decode_num_drafts_total")
    draft_tokens = metric(text, "vllm:spec_decode_num_draft_tokens_total")
    accepted = metric(text, "vllm:spec_decode_num_accepted_tokens_total")
    per_pos = [
        float(v) for v in re.findall(r'^vllm:spec_decode_num_accepted_tokens_per_pos_total\{[^}]*\} (\S+)', text, re.M)
    ]
    assert 0 < drafts <= draft_tokens <= 2 * drafts
    assert 0 < accepted <= draft_tokens and sum(per_pos) == accepted and len(per_pos) == 2
    # every verification emits its accepted drafts plus one token: 2 x 24 tokens, less the two first tokens
    assert drafts + accepted <= 2 * 23
