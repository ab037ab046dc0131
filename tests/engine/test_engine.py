"""The continuous-batching engine (v4/engine), on `tiny` with the reference backend in float64.

The expected tokens come from outside the engine: an argmax chain computed by running the whole
growing sequence from scratch at every step (`Transformer.logits`, one fresh prefill per token,
never the decode path of the cache), or a request run alone. fp64 keeps near-ties from blurring
"same tokens"; logits are compared with a 1e-9 relative bound (batch composition changes only
the rounding of differently shaped matmuls).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import rel_err
from v4.config import RuntimeConfig
from v4.engine import LLM, SamplingParams
from v4.errors import ConfigError, InputError
from v4.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def model():
    from v4.runtime import load

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DSV4_BACKEND", raising=False)
        return load(config="tiny", overrides={"backend": "reference", "dtype": "float64"}, progress=False).model


def recompute_chain(model, ids, n, banned_until=None):
    """Greedy tokens by full recomputation; banned_until=(k, tokens): those tokens may not come
    before the k-th output token (what min_tokens does to EOS and stop ids)."""
    seq, out = list(ids), []
    for _ in range(n):
        row = model.logits(seq)[-1].clone()
        if banned_until and len(out) < banned_until[0]:
            row[list(banned_until[1])] = float("-inf")
        out.append(int(row.argmax()))
        seq.append(out[-1])
    return out


def fixed_bytes(geo, slots: int) -> int:
    """What a byte budget pays before pool tokens: each slot's ring and compressor state, and one
    partly filled block per ratio."""
    return slots * (geo.slot_bytes + sum(geo.block_bytes.values()))


def rt(**kw) -> RuntimeConfig:
    base = dict(max_num_seqs=4, max_model_len=96, block_size=4, max_num_batched_tokens=64)
    base.update(kw)
    return RuntimeConfig(**base)


GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
# lengths around tiny's features: window 16, CSA ratio 4, HCA ratio 16
LENGTHS = [1, 3, 15, 16, 17, 31, 33, 47]


def prompt(n, salt=0):
    return [(7 * i + 13 * salt + 3) % 500 + 3 for i in range(n)]


def run(llm, arrivals, params=GREEDY):
    """arrivals: {step index: [prompt, ...]}: requests join while others run. Returns, per prompt in
    arrival order, (tokens, the logits row each token was sampled from) and the step count."""
    llm.logits_mode = "all"
    order, got, step = [], {}, 0
    pending = dict(arrivals)
    while pending or llm.has_unfinished():
        for p in pending.pop(step, []):
            rid = llm.add_request(p, params)
            order.append(rid)
            got[rid] = ([], [])
        outs = llm.step()
        rec = llm.last_step
        for out in outs:
            j = [i for i, _, _ in rec.scheduled].index(out.request_id)
            got[out.request_id][0].extend(out.new_token_ids)
            got[out.request_id][1].append(rec.logits[rec.offsets[j] + rec.scheduled[j][2] - 1])
        step += 1
    return [got[r] for r in order]


@pytest.fixture(scope="module")
def alone(model):
    """Each prompt run alone through the engine, after checking it against full recomputation."""
    res = {}
    for n in LENGTHS:
        toks, rows = run(LLM(model, rt()), {0: [prompt(n)]})[0]
        assert toks == recompute_chain(model, prompt(n), 6), n
        res[n] = (toks, rows)
    return res


def assert_same(got, want):
    assert got[0] == want[0]
    assert len(got[1]) == len(want[1])
    for a, b in zip(got[1], want[1]):
        assert rel_err(a, b) < 1e-9


def test_staggered_arrivals_get_what_they_get_alone(model, alone):
    # requests join at steps 0, 1, 3, 4, 6 while earlier ones decode (and finish, and leave)
    arrivals = {0: [prompt(17), prompt(1)], 1: [prompt(33)], 3: [prompt(3), prompt(47)], 4: [prompt(16)],
                6: [prompt(15), prompt(31)]}
    lens = [17, 1, 33, 3, 47, 16, 15, 31]
    llm = LLM(model, rt())
    results = run(llm, arrivals)
    for n, got in zip(lens, results):
        assert_same(got, alone[n])
    assert llm.kv_cache_usage() == 0.0


def test_steps_mix_decode_tokens_and_prompt_chunks(model, alone):
    # a budget of 6 tokens: the 47-token prompt is chunked while the short ones decode beside it
    llm = LLM(model, rt(max_num_batched_tokens=6))
    seen_mixed = []
    orig = llm.runner.run

    def spy(step, logits="last"):
        kinds = {s.start >= s.seq.num_prompt_tokens for s in step}
        seen_mixed.append(kinds == {True, False})
        assert sum(s.num_tokens for s in step) <= 6
        return orig(step, logits)

    llm.runner.run = spy
    results = run(llm, {0: [prompt(3), prompt(1)], 2: [prompt(47)]})
    for n, got in zip([3, 1, 47], results):
        assert_same(got, alone[n])
    assert any(seen_mixed)


@pytest.mark.parametrize("chunk", [1, 4, 5, 16])
def test_chunked_prefill_equals_one_whole_prefill(model, alone, chunk):
    llm = LLM(model, rt(prefill_chunk=chunk))
    widths = []
    orig = llm.runner.run
    llm.runner.run = lambda step, logits="last": widths.append([s.num_tokens for s in step]) or orig(step, logits)
    results = run(llm, {0: [prompt(47), prompt(33)], 1: [prompt(17)]})
    assert max(max(w) for w in widths) == min(chunk, 47)  # no sequence got more than its chunk in a step
    for n, got in zip([47, 33, 17], results):
        assert_same(got, alone[n])


def test_preempted_sequences_recompute_to_the_same_tokens(model):
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [prompt(n, salt=1) for n in (31, 17, 40, 9)]
    want = [recompute_chain(model, p, 24) for p in prompts]
    geo = LLM(model, rt()).runner.cache.geometry
    # pools for 80 tokens of context (+ a last block per slot): four sequences of up to 64 tokens cannot all fit
    budget = fixed_bytes(geo, 4) + math.ceil(geo.pool_bytes_per_token() * 80)
    llm = LLM(model, rt(kv_cache_memory=budget, max_model_len=64, max_num_batched_tokens=16))
    assert {m: t.num_blocks for m, t in llm.runner.cache.tables.items()} == {4: 80 // 16 + 4, 16: 80 // 64 + 4}
    got = [c.output_ids for c in llm.generate(prompts, params)]
    assert llm.stats.num_preemptions > 0
    assert got == want
    assert llm.kv_cache_usage() == 0.0


def test_preemption_takes_the_most_recently_admitted(model):
    geo = LLM(model, rt()).runner.cache.geometry
    # pools for 128 tokens of context: 8 blocks of 16 tokens at ratio 4, 2 blocks of 64 at ratio 16,
    # plus a last block per slot; sequences of 94 and 86 tokens need 6 + 6 blocks at ratio 4
    budget = fixed_bytes(geo, 3) + math.ceil(geo.pool_bytes_per_token() * 128)
    llm = LLM(model, rt(kv_cache_memory=budget, max_num_seqs=3))
    assert {m: t.num_blocks for m, t in llm.runner.cache.tables.items()} == {4: 8 + 3, 16: 2 + 3}
    a = llm.add_request(prompt(16), SamplingParams(max_tokens=78, ignore_eos=True))
    llm.step()
    b = llm.add_request(prompt(16, 1), SamplingParams(max_tokens=70, ignore_eos=True))
    llm.step()
    assert [s.id for s in llm.scheduler.running] == [a, b]
    seq_a, seq_b = llm.sequence(a), llm.sequence(b)
    while llm.stats.num_preemptions == 0:  # both grow until a block is missing
        llm.step()
    assert [s.id for s in llm.scheduler.running] == [a]
    assert llm.sequence(b).status.value == "preempted" and llm.sequence(b).slot is None
    assert llm.sequence(b).num_computed == 0 and list(llm.scheduler.waiting)[0].id == b
    want = [recompute_chain(model, prompt(16, s), n) for s, n in ((0, 78), (1, 70))]
    while llm.has_unfinished():
        llm.step()
    assert [seq_a.output_ids, seq_b.output_ids] == want


def test_abort_frees_every_block(model):
    llm = LLM(model, rt())
    ids = [llm.add_request(prompt(n), SamplingParams(max_tokens=20, ignore_eos=True)) for n in (47, 33, 5)]
    llm.step()
    llm.step()
    assert llm.kv_cache_usage() > 0
    late = llm.add_request(prompt(20), SamplingParams(max_tokens=20))  # still waiting
    assert all(llm.abort(i) for i in ids + [late])
    assert not llm.abort(ids[0])  # already finished
    assert llm.kv_cache_usage() == 0.0
    cache = llm.runner.cache
    assert all(len(t.free) == t.num_blocks for t in cache.tables.values()) and not any(cache.in_use)
    outs = llm.step()
    assert sorted(o.request_id for o in outs) == sorted(ids + [late])
    assert all(o.finished and o.finish_reason == "abort" for o in outs)
    assert not llm.has_unfinished()


def test_usage_is_the_share_of_bytes_held(model):
    llm = LLM(model, rt(max_num_batched_tokens=64))
    llm.add_request(prompt(40), SamplingParams(max_tokens=2))
    llm.step()  # the 40 prompt tokens are in the cache
    cache, geo = llm.runner.cache, llm.runner.cache.geometry
    # 40 tokens: ratio 4 -> 10 entries -> 3 blocks of 4; ratio 16 -> 2 entries -> 1 block
    held = geo.slot_bytes + 3 * geo.block_bytes[4] + 1 * geo.block_bytes[16]
    assert llm.kv_cache_usage() == pytest.approx(held / cache.bytes_used(), rel=1e-12)


@pytest.mark.parametrize("others", [[], [3], [40, 7], [1, 16, 33]])
def test_seeded_sampling_is_the_same_whatever_shares_the_step(model, others):
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=10, ignore_eos=True)
    mine = prompt(20, 5)
    llm = LLM(model, rt())
    for i, n in enumerate(others):
        llm.add_request(prompt(n, i), SamplingParams(temperature=0.8, seed=i, max_tokens=7, ignore_eos=True))
    rid = llm.add_request(mine, p)
    got = []
    while llm.has_unfinished():
        got += [t for o in llm.step() if o.request_id == rid for t in o.new_token_ids]
    want = LLM(model, rt()).generate([mine], p)[0].output_ids
    assert got == want
    other_seed = LLM(model, rt()).generate([mine], SamplingParams(**{**p.__dict__, "seed": 99}))[0].output_ids
    assert other_seed != want  # sampled, not greedy: another seed draws other tokens


def test_stop_token_ids_and_max_tokens(model):
    p = prompt(17)
    chain = recompute_chain(model, p, 10)
    llm = LLM(model, rt())
    stop_id = chain[4]
    first = chain.index(stop_id)
    res = llm.generate([p, p], [SamplingParams(max_tokens=10, stop_token_ids=[stop_id], ignore_eos=True),
                                SamplingParams(max_tokens=7, ignore_eos=True)])
    assert res[0].output_ids == chain[:first + 1] and res[0].finish_reason == "stop"
    assert res[1].output_ids == chain[:7] and res[1].finish_reason == "length"


def test_eos_ignore_eos_and_min_tokens(model, monkeypatch):
    p = prompt(33)
    chain = recompute_chain(model, p, 10)
    eos = chain[2]
    first = chain.index(eos)
    monkeypatch.setattr(model.cfg, "eos_token_id", eos)
    llm = LLM(model, rt())
    stop, ignored, held = llm.generate(
        [p, p, p],
        [
            SamplingParams(max_tokens=10),
            SamplingParams(max_tokens=10, ignore_eos=True),
            SamplingParams(max_tokens=10, min_tokens=5),
        ],
    )
    assert stop.output_ids == chain[:first + 1] and stop.finish_reason == "stop"
    assert ignored.output_ids == chain and ignored.finish_reason == "length"
    # min_tokens: EOS may not be drawn before the 5th token, so the chain goes another way
    want = recompute_chain(model, p, 10, banned_until=(5, [eos]))
    if eos in want[5:]:
        want = want[:want.index(eos, 5) + 1]
    assert held.output_ids == want
    assert eos not in held.output_ids[:5]


def test_stop_strings_cut_the_text_and_are_not_emitted(model):
    tok = ByteTokenizer(model.cfg.vocab_size)
    p = tok.encode("stop strings")
    chain = recompute_chain(model, p, 16)
    full = tok.decode(chain)
    assert len(full) >= 6, "the chain must decode to some text for this test"
    # two characters of real text (random weights also emit bytes that decode to U+FFFD), not at the start
    i = next(i for i in range(1, len(full) - 1) if "\ufffd" not in full[i:i + 2])
    stop = full[i:i + 2]
    cut = full.index(stop)
    assert cut > 0
    # the token that completes the stop string ends the output (tokens up to it are kept, as vLLM)
    k = next(k for k in range(1, 17) if stop in tok.decode(chain[:k]))
    llm = LLM(model, rt(), tokenizer=tok)
    rid = llm.add_request(p, SamplingParams(max_tokens=16, stop=[stop, "never-there"], ignore_eos=True))
    seq = llm.sequence(rid)
    streamed, outs = "", []
    while llm.has_unfinished():
        for o in llm.step():
            streamed += o.new_text
            outs.append(o)
    assert streamed == full[:cut]
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    assert [t for o in outs for t in o.new_token_ids] == chain[:k]
    assert seq.text == full[:cut]
    with pytest.raises(KeyError):  # a finished request is let go of
        llm.sequence(rid)
    # without the stop string the whole text streams out
    res = LLM(model, rt(), tokenizer=tok).generate([p], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert res.text == full


def test_logprobs_are_log_softmax_of_the_logits_parity_records(model):
    from parity.record import Options, Prompt, record

    prompts = [prompt(17), prompt(5, 3)]
    tensors, _ = record(model, [Prompt(p) for p in prompts], Options(greedy_tokens=5, layers="none"))
    res = LLM(model, rt()).generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True, logprobs=3))
    for i, r in enumerate(res):
        lp = torch.log_softmax(tensors[f"prompt.{i}.greedy_logits"].double(), -1)
        assert r.output_ids == tensors[f"prompt.{i}.greedy_ids"].tolist()
        for k, x in enumerate(r.logprobs):
            assert x.token_id == r.output_ids[k]
            assert x.logprob == pytest.approx(float(lp[k, x.token_id]), abs=1e-5)  # the bundle keeps float32
            top = lp[k].topk(3)
            assert [t for t, _ in x.top] == top.indices.tolist()
            assert [v for _, v in x.top] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_refused_requests_say_why_and_the_engine_keeps_serving(model):
    llm = LLM(model, rt(max_model_len=40))
    ok = llm.sequence(llm.add_request(prompt(10), SamplingParams(max_tokens=5, ignore_eos=True)))
    llm.step()
    cases = [
        (prompt(30), SamplingParams(max_tokens=20), "maximum context length is 40 tokens, but the request needs 50"),
        ([], SamplingParams(), "empty prompt"),
        ([5, 512], SamplingParams(), "token id 512 is outside the vocabulary"),
        ([5], SamplingParams(temperature=-1), "temperature must be >= 0"),
        ([5], SamplingParams(stop=["x"]), "stop strings need a tokenizer"),
    ]
    for ids, params, msg in cases:
        with pytest.raises(InputError, match=msg):
            llm.add_request(ids, params)
    while llm.has_unfinished():
        llm.step()
    assert len(ok.output_ids) == 5
    assert llm.kv_cache_usage() == 0.0


def test_a_request_larger_than_the_whole_cache_is_refused(model):
    geo = LLM(model, rt()).runner.cache.geometry
    budget = fixed_bytes(geo, 2) + math.ceil(geo.pool_bytes_per_token() * 32)  # 2 + 2 ratio-4 blocks of 16 tokens
    llm = LLM(model, rt(kv_cache_memory=budget, max_num_seqs=2))
    with pytest.raises(InputError, match="needs 5 blocks of the ratio-4 pool, which holds 4 in all"):
        llm.add_request(prompt(60), SamplingParams(max_tokens=8))  # 68 tokens: 17 entries
    assert llm.generate([prompt(20)], SamplingParams(max_tokens=4, ignore_eos=True))[0].finish_reason == "length"


def test_a_budget_below_the_fixed_state_is_a_config_error(model):
    with pytest.raises(ConfigError, match="kv_cache_memory=1000 bytes does not even hold"):
        LLM(model, rt(kv_cache_memory=1000))


def test_max_num_seqs_caps_the_running_set(model):
    llm = LLM(model, rt(max_num_seqs=2))
    for n in (5, 6, 7):
        llm.add_request(prompt(n), SamplingParams(max_tokens=3, ignore_eos=True))
    llm.step()
    assert len(llm.scheduler.running) == 2 and len(llm.scheduler.waiting) == 1
    while llm.has_unfinished():
        llm.step()
        assert len(llm.scheduler.running) <= 2


def test_zero_max_tokens_finishes_without_running(model):
    llm = LLM(model, rt())
    res = llm.generate([[5, 6], [7]], SamplingParams(max_tokens=0))
    assert [r.output_ids for r in res] == [[], []] and {r.finish_reason for r in res} == {"length"}
    assert llm.stats.steps == 0


def test_token_budget_serves_running_first_then_waiting_in_order(model):
    # budget 10: two decoding sequences take 1 token each, the new 20-token prompt gets the other 8,
    # then 8 again, then its last 4; the fourth request waits for a free sequence slot (max_num_seqs 3)
    llm = LLM(model, rt(max_num_batched_tokens=10, max_num_seqs=3))
    plans = []
    orig = llm.runner.run
    llm.runner.run = lambda step, logits="last": (
        plans.append([(s.seq.id, s.start, s.num_tokens) for s in step]) or orig(step, logits)
    )
    a = llm.add_request(prompt(4), SamplingParams(max_tokens=8, ignore_eos=True))
    b = llm.add_request(prompt(5, 1), SamplingParams(max_tokens=8, ignore_eos=True))
    llm.step()
    c = llm.add_request(prompt(20, 2), SamplingParams(max_tokens=2, ignore_eos=True))
    d = llm.add_request(prompt(3, 3), SamplingParams(max_tokens=2, ignore_eos=True))
    for _ in range(4):
        llm.step()
    assert plans == [
        [(a, 0, 4), (b, 0, 5)],
        [(a, 4, 1), (b, 5, 1), (c, 0, 8)],
        [(a, 5, 1), (b, 6, 1), (c, 8, 8)],
        [(a, 6, 1), (b, 7, 1), (c, 16, 4)],  # c's prompt is in: it samples its first token
        [(a, 7, 1), (b, 8, 1), (c, 20, 1)],  # c finishes (max_tokens 2) ...
    ]
    llm.step()
    assert plans[-1] == [(a, 8, 1), (b, 9, 1), (d, 0, 3)]  # ... and d takes its slot


def _byte_level_bpe(path, vocab_size):
    """A GPT-2-style byte-level BPE tokenizer.json: ids 3..258 are the 256 byte symbols, the rest
    multi-byte tokens (words with a leading space, multi-byte UTF-8 characters, fragments), so
    decoding depends on neighbours and partial characters occur."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_sym = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: ord(ch))
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2}
    for ch in byte_sym:
        vocab[ch] = len(vocab)
    words = [" the", " cat", " é", "ü", "日本", " naïve", "ing", " 🙂", "ab", " x"]
    enc = {b: c for b, c in zip(range(256), [c for _, c in sorted(
        ((b, c) for b, c in _gpt2_bytes().items()), key=lambda t: t[0])])}
    i = 0
    while len(vocab) < vocab_size:
        w = "".join(enc[b] for b in (words[i % len(words)] + str(i // len(words))).encode())
        vocab.setdefault(w, len(vocab))
        i += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))
    return path


def _gpt2_bytes():
    """byte -> printable symbol of the byte-level alphabet (GPT-2's table, by its published rule)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def test_streamed_text_is_the_decoded_output_with_a_real_tokenizer(model, tmp_path):
    from v4.tokenizer import HFTokenizer

    tok = HFTokenizer(_byte_level_bpe(tmp_path / "tokenizer.json", model.cfg.vocab_size), bos=0)
    llm = LLM(model, rt(), tokenizer=tok)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True)
    ids = [llm.add_request(prompt(n, 7), params) for n in (5, 12)]
    streamed = {i: "" for i in ids}
    tokens = {i: [] for i in ids}
    while llm.has_unfinished():
        for o in llm.step():
            streamed[o.request_id] += o.new_text
            tokens[o.request_id] += o.new_token_ids
    for i in ids:
        assert streamed[i] == tok.decode(tokens[i])
        assert any(t > 258 for t in tokens[i])  # multi-byte tokens were drawn


def test_generate_is_all_or_nothing(model):
    llm = LLM(model, rt())
    with pytest.raises(InputError, match="^prompt 2: token id 600"):
        llm.generate([prompt(5), prompt(6), [600]], SamplingParams(max_tokens=3))
    assert not llm.has_unfinished() and llm.kv_cache_usage() == 0.0
    assert llm.generate([prompt(5)], SamplingParams(max_tokens=3, ignore_eos=True))[0].finish_reason == "length"
