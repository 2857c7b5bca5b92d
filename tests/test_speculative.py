"""Speculative decoding (lesson 05): greedy outputs are plain `generate`'s, sampled outputs follow the target.

Greedy: token-for-token against `generate(model, ...)` without a cache, on random Llama / Qwen2 models,
with an unrelated draft (most steps keep nothing), the target itself as its draft (every step keeps
all k), n-gram lookup, ragged batches, k = 1 and k = 8, both paths (static and paged).

Sampling: the first two generated tokens of 10^4 samples are tested (chi-square) against the target's
exact joint distribution on a 6-token vocabulary, for the static path (one prompt per row: the single-
prompt path is this same code at B = 1) and the paged path an engine drives; the same test must reject
a plausible wrong rule (resampling from p instead of the residual after a rejection).
"""

from __future__ import annotations

import pytest
import torch

import nexus_lessons.speculative.static as static_mod
from conftest import hf_model
from nexus_lessons import ModelConfig, NGramSpeculator, PagedKVCache, SpeculativeDecoder, Transformer, from_hf, generate
from nexus_lessons.sampling import logits_to_probs
from nexus_lessons.speculative import BatchedSpeculator, accept_sampled, residual, sample_from
from nexus_lessons.speculative.rejection import _accepted_count, chi_square


# --- the rule itself ------------------------------------------------------------------------------

def test_accept_then_residual_gives_back_p_exactly():
    """One draft from q: P(out = x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y min(p, q)) residual(x) = p(x)."""
    g = torch.Generator().manual_seed(0)
    for V in (2, 7, 50):
        keep = torch.rand(64, V, generator=g) > 0.3  # some tokens the target never picks
        keep[:, 0] = True
        p = torch.rand(64, V, generator=g).pow(3).softmax(-1) * keep
        p = p / p.sum(-1, keepdim=True)
        q = torch.rand(64, V, generator=g).pow(3)
        q = q / q.sum(-1, keepdim=True)
        kept = torch.minimum(p, q)
        out = kept + (1 - kept.sum(-1, keepdim=True)) * residual(p, q)
        torch.testing.assert_close(out, p, atol=1e-6, rtol=0)
    same = torch.softmax(torch.randn(3, 5, generator=g), -1)
    torch.testing.assert_close(residual(same, same), same)  # nothing left: p comes back, never NaN


def test_sample_from_never_picks_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).expand(4, -1)
    u = torch.tensor([1e-9, 0.5, 0.5 + 1e-7, 1.0])
    assert sample_from(probs, u).tolist() == [1, 1, 3, 3]


# --- n-gram lookup --------------------------------------------------------------------------------

def test_ngram_latest_occurrence_longest_n_first():
    spec = NGramSpeculator(n=3)
    got = spec.propose([
        [1, 2, 3, 4, 5, 6, 1, 2, 3],  # 3-gram seen once: what followed it
        [1, 2, 3, 9, 9, 1, 2, 3, 7, 7, 1, 2, 3],  # seen twice: the latest one
        [4, 1, 2, 8, 3, 1, 2],  # no earlier (3, 1, 2): falls back to (1, 2)
        [5, 5, 5, 5],  # overlapping repeat: only what exists after the match
        [1, 2, 3],  # nothing earlier at all
    ], 4)
    assert got == [[4, 5, 6, 1], [7, 7, 1, 2], [8, 3, 1, 2], [5], []]
    assert NGramSpeculator(n=3, min_n=3).propose([[4, 1, 2, 8, 3, 1, 2]], 4) == [[]]
    with pytest.raises(ValueError, match="min_n"):
        NGramSpeculator(n=2, min_n=3)


# --- greedy: exactly plain generate ---------------------------------------------------------------

def _models(family: str):
    target = from_hf(hf_model(family, tie=family == "qwen2", seed=0))
    unrelated = from_hf(hf_model(family, tie=False, seed=1, layers=1, hidden=32, heads=2, kv_heads=1, inter=48))
    return target, unrelated


def _prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(3, 256, (4,), generator=g).tolist()
    return [motif * 3 + [7], torch.randint(3, 256, (1,), generator=g).tolist(),
            torch.randint(3, 256, (13,), generator=g).tolist()]  # 13, 1 and 13 tokens, a repeated motif


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_equals_generate(family):
    target, unrelated = _models(family)
    prompts = _prompts()
    want = generate(target, prompts, 23)
    cases = [("unrelated", unrelated, 3), ("identical", target, 8), ("ngram", NGramSpeculator(2), 1),
             ("unrelated", unrelated, 8)]
    # "static": eager runs stop drafting when the draft is unsure; "static, all k": with that off, every
    # step drafts k tokens and verifies k + 1 positions, as the CUDA-graph path does.
    for cache in ("static", "static, all k", "paged"):
        full_k = cache != "static"
        for name, draft, k in cases:
            dec = SpeculativeDecoder(target, draft, k)
            if cache == "static, all k":
                dec.draft_confidence = 0.0
            got = dec.generate(prompts, 23, cache=cache.split(",")[0])
            assert torch.equal(got, want), (family, name, k, cache)
            acc, offered = dec.last_stats.accepted_per_step, dec.last_stats.proposed_per_step
            if name == "identical":  # the target agrees with itself: every draft offered is kept
                assert acc == offered, (acc, offered)
                if full_k:
                    assert all(a == k for row in acc for a in row[:-1]), acc
            if name == "unrelated":
                assert any(a == 0 for row in acc for a in row), acc  # steps where nothing is accepted
            if cache == "static":
                single = dec.generate(torch.tensor([prompts[2]]), 23)  # one prompt: flat per-step stats
                assert torch.equal(single, generate(target, [prompts[2]], 23))
                assert isinstance(dec.last_stats.accepted_per_step[0], int)


def test_left_padded_tensor_and_eos_like_generate():
    target, unrelated = _models("llama")
    ids = generate(target, _prompts(), 30)
    eos = int(ids[0, 20])  # a token the first row emits mid-way: it stops there, the others go on
    pad_ids, mask = torch.tensor([[0] * 12 + [5], list(range(40, 53))]), torch.tensor([[0] * 12 + [1], [1] * 13])
    for inp, kw in [(_prompts(), {}), (pad_ids, {"attention_mask": mask})]:
        want = generate(target, inp, 30, eos_token_id=eos, pad_token_id=1, **kw)
        for cache in ("static", "paged"):
            got = SpeculativeDecoder(target, unrelated, 3).generate(inp, 30, eos_token_id=eos, pad_token_id=1,
                                                                     cache=cache, **kw)
            assert torch.equal(got, want), cache


def test_engine_path_rows_join_and_leave():
    """Drive BatchedSpeculator as an engine does: a row joins mid-way, rows finish at different times,
    and every block goes back to the pool."""
    target, unrelated = _models("qwen2")
    prompts = _prompts(1)
    want = [generate(target, [p], 20)[0, len(p):].tolist() for p in prompts]
    cache = PagedKVCache.for_model(target, 64, 16)
    spec = BatchedSpeculator(target, unrelated, 4)
    tokens, sid, outs = {}, {}, {}
    for step in range(60):
        if step in (0, 3):  # rows 0, 1 start at once, row 2 three steps later
            for i in ((0, 1) if step == 0 else (2,)):
                sid[i], tokens[i], outs[i] = cache.add_sequence(), list(prompts[i]), []
        live = [i for i in sid if len(outs[i]) < 20]
        if not live:
            break
        for i, new in zip(live, spec.step(cache, [sid[i] for i in live], [tokens[i] for i in live])):
            new = new[: 20 - len(outs[i])]
            outs[i] += new
            tokens[i] += new
            if len(outs[i]) == 20:
                cache.free(sid[i])
                spec.free(sid[i])
            else:
                assert cache.num_tokens(sid[i]) == len(tokens[i]) - 1  # the invariant between steps
    assert [outs[i] for i in range(3)] == want
    cache.check_consistent()
    assert cache.num_used_blocks == 0 and spec.proposer.cache.num_used_blocks == 0


# --- sampling: the target's distribution, checked statistically -------------------------------------

V = 6
PROMPT = [1, 2, 3]


def _tiny(seed: int, std: float = 0.5) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, std)
    return m


@pytest.fixture(scope="module")
def pair():
    """A target and a draft near it (its weights plus noise): about 40% of drafts kept, so both branches run."""
    target, draft = _tiny(0), _tiny(0)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return target, draft


def _joint(target, sampling) -> torch.Tensor:
    """The target's exact distribution of the first two tokens after PROMPT, [V, V]."""
    with torch.no_grad():
        p1 = logits_to_probs(target(torch.tensor([PROMPT]))[0, -1], *sampling)
        p2 = logits_to_probs(target(torch.tensor([PROMPT + [a] for a in range(V)]))[:, -1], *sampling)
    return p1[:, None] * p2


def _first_two(dec, n, sampling, cache, seed=0):
    out = dec.generate([PROMPT] * n, 2, temperature=sampling[0], top_k=sampling[1], top_p=sampling[2],
                       generator=torch.Generator().manual_seed(seed), cache=cache)
    return torch.bincount(out[:, 3] * V + out[:, 4], minlength=V * V)


def _resample_from_p(p, drafts, num_drafts, q, u_accept, u_next):
    """The classic mistake: after a rejection, sample from p instead of norm(max(0, p - q))."""
    k = drafts.shape[1]
    p_d = p[:, :k].gather(-1, drafts[..., None])[..., 0]
    q_d = q.gather(-1, drafts[..., None])[..., 0]
    n = _accepted_count(u_accept * q_d < p_d, num_drafts)
    return n, sample_from(p.gather(1, n[:, None, None].expand(-1, 1, p.shape[-1]))[:, 0], u_next)


def test_static_path_samples_the_target_joint(pair, monkeypatch):
    """Temperature, top-k and top-p applied to both models' distributions (the paged test below runs at
    plain temperature 1)."""
    target, draft = pair
    sampling = (1.5, 4, 0.95)
    dec = SpeculativeDecoder(target, draft, 2)
    joint = _joint(target, sampling)
    stat, df, p_value = chi_square(_first_two(dec, 10_000, sampling, "static"), joint)
    assert p_value > 1e-3, (stat, df, p_value)
    assert 0.2 < dec.last_stats.acceptance_rate < 0.8  # both the accept and the reject branch ran often
    # The test of the test: the wrong rule is caught by the same check on as many samples.
    monkeypatch.setattr(static_mod, "accept_sampled", _resample_from_p)
    stat, df, p_value = chi_square(_first_two(dec, 10_000, sampling, "static"), joint)
    assert p_value < 1e-6, (stat, df, p_value)


def test_paged_path_samples_the_target_joint(pair):
    """The engine's path (the CPU reference kernels loop over rows, so fewer samples: 2000)."""
    target, draft = pair
    sampling = (1.0, None, None)
    stat, df, p_value = chi_square(_first_two(SpeculativeDecoder(target, draft, 2), 2000, sampling, "paged", 1),
                                   _joint(target, sampling))
    assert p_value > 1e-3, (stat, df, p_value)


def test_ngram_sampling_is_the_target_distribution(pair):
    """A deterministic proposer is q = one-hot: the same rule, through the static path."""
    target, _ = pair
    sampling = (1.0, None, None)
    counts = _first_two(SpeculativeDecoder(target, NGramSpeculator(n=1), 3), 10_000, sampling, "static", 2)
    assert chi_square(counts, _joint(target, sampling))[2] > 1e-3


def test_sampling_is_reproducible_with_a_generator(pair):
    target, draft = pair
    dec = SpeculativeDecoder(target, draft, 3)
    a, b = (dec.generate([PROMPT], 12, temperature=1.0, generator=torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(a, b)


# --- bad input ------------------------------------------------------------------------------------

def test_bad_input_is_named():
    target, unrelated = _models("llama")
    other_vocab = Transformer(ModelConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="vocabulary"):
        SpeculativeDecoder(target, other_vocab)
    with pytest.raises(TypeError, match="draft"):
        SpeculativeDecoder(target, "nexus-tiny-draft")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeDecoder(target, unrelated, 0)
    dec = SpeculativeDecoder(target, unrelated, 2)
    for kwargs, match in [({"input_ids": [[]]}, "empty prompt"), ({"max_new_tokens": -1}, "max_new_tokens"),
                          ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                          ({"input_ids": [[5, 300]]}, "token id"), ({"cache": "dynamic"}, "cache")]:
        args = {"input_ids": [[5, 6]], "max_new_tokens": 4, **kwargs}
        with pytest.raises(ValueError, match=match):
            dec.generate(args.pop("input_ids"), args.pop("max_new_tokens"), **args)
    with pytest.raises(ValueError, match="no shipped draft"):
        SpeculativeDecoder.from_pretrained("nexus-tiny-draft")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_path_equals_generate():
    target, unrelated = (m.cuda() for m in _models("llama"))
    prompts = _prompts()
    want = generate(target, prompts, 40)
    for draft in (unrelated, NGramSpeculator()):
        dec = SpeculativeDecoder(target, draft, 4)
        assert dec.use_graph
        for _ in range(2):  # the second call replays the graphs captured by the first
            assert torch.equal(dec.generate(prompts, 40), want)
        sampled = [dec.generate(prompts, 30, temperature=1.0, top_p=0.9,
                                generator=torch.Generator(device="cuda").manual_seed(0)) for _ in range(2)]
        assert torch.equal(*sampled)  # the sampling graph replays with the same uniforms: the same tokens


def test_benchmark_smoke_run(tmp_path):
    """`python -m nexus_lessons.bench speculative --smoke`: the whole script on toy models, JSON written."""
    import json

    from nexus_lessons.bench import speculative

    speculative.main(["--out", str(tmp_path), "--smoke"])
    data = json.loads((tmp_path / "speculative_cpu.json").read_text())
    for workload in ("completion", "edit"):
        w = data["workloads"][workload]
        assert all(v for k, v in w["checks"].items() if not k.startswith("transformers")), w["checks"]
        assert {"plain", "draft k=2, all k", "draft k=3", "ngram k=3", "transformers generate"} <= w["rows"].keys()
        assert 0.0 <= w["alpha_teacher_forced"] <= 1.0 and w["rows"]["draft k=2, all k"]["predicted_speedup"] > 0
    assert speculative.expected_tokens(0.0, 4) == 1 and speculative.expected_tokens(1.0, 4) == 5
    assert abs(speculative.expected_tokens(0.5, 2) - 1.75) < 1e-12


def test_distilled_draft_starts_as_the_target_cut_down():
    """tiny.distill's init: a one-layer draft of the target's shape computes what the target's first layer,
    final norm and lm_head compute."""
    from dataclasses import replace

    from nexus_lessons.tiny.train import init_from_target

    target, _ = _models("llama")
    draft = Transformer(replace(target.config, num_hidden_layers=1))
    init_from_target(draft, target)
    ids = torch.tensor([[5, 9, 3, 200, 7]])
    with torch.no_grad():
        x = target.embed_tokens(ids)
        cos, sin = target.rotary(torch.arange(5)[None], x.dtype)
        want = target.lm_head(target.norm(target.layers[0](x, cos, sin)))
        torch.testing.assert_close(draft(ids), want)
    with pytest.raises(ValueError, match="layer shape"):
        init_from_target(Transformer(replace(target.config, num_hidden_layers=1, intermediate_size=64)), target)


def test_distill_smoke_run_and_install(tmp_path):
    """`python -m nexus_lessons.tiny.distill --smoke`: a few CPU steps through the whole script, then
    `--install` into a copy of the assets (weights, JSON, the model card's section)."""
    import dataclasses
    import json
    import shutil

    from nexus_lessons.loading import ASSETS, load_model
    from nexus_lessons.tiny import distill

    results = distill.main(["--out", str(tmp_path / "run"), "--smoke"])
    assert results["agreement"]["after"]["model"]["num_hidden_layers"] == 1
    for s in ("heldout_stdlib", "outside_stdlib"):
        assert 0 <= results["agreement"]["after"][s]["greedy_agreement_on_target_output"] <= 1
    assets = tmp_path / "assets"
    shutil.copytree(ASSETS, assets)
    distill.install(tmp_path / "run", assets=assets, results=tmp_path / "distill.json")
    model, tok = load_model(assets / "nexus-tiny-draft")
    assert model.config.num_hidden_layers == 1 and tok is not None
    card = (assets / "MODEL_CARD.md").read_text()
    assert "1 layer(s) of hidden 256" in card and "started from the target's embedding" in card
    assert card.count(distill.CARD_BEGIN) == 1
    assert json.loads((tmp_path / "distill.json").read_text())["smoke"] is True
    # --init-from: the student starts as an existing draft and keeps its shape
    refined = distill.main(["--out", str(tmp_path / "refined"), "--smoke", "--init-from", "nexus-tiny-draft"])
    shipped, _ = load_model("nexus-tiny-draft", tokenizer=False)
    assert refined["recipe"]["draft_config"] == dataclasses.asdict(shipped.config)
    assert refined["agreement"]["after"]["model"]["num_hidden_layers"] == shipped.config.num_hidden_layers
