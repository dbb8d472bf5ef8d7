"""The distillation recipe's data: training prompts and evaluation domains are disjoint by source, the teacher
writes its own training text (chat answers in its chat format), and the report scores each domain and chat."""
from __future__ import annotations

import numpy as np
import pytest

from export.distill import domains
from export.distill.data import ngrams, pack, synthesize, synthetic_prompts


def test_training_and_evaluation_sources_are_disjoint():
    assert set(domains.TRAIN_SOURCES).isdisjoint(domains.EVAL_SOURCES)
    assert len({d.source for d in domains.EVAL_DOMAINS}) == len(domains.EVAL_DOMAINS) >= 3
    assert set(domains.CHAT_PROMPTS).isdisjoint(domains.EVAL_CHAT_PROMPTS)
    assert len(domains.EVAL_CHAT_PROMPTS) >= 5


def test_training_prompts_appear_in_no_evaluation_text():
    texts = "\n".join(t for d in domains.EVAL_DOMAINS for t in d.load())
    for prompt in domains.TEXT_STARTS + domains.CHAT_PROMPTS + domains.EVAL_CHAT_PROMPTS:
        assert prompt not in texts, prompt


def test_public_text_comes_from_third_party_packages_within_its_budget():
    import sys

    texts = domains.public_texts()
    assert set(texts) == set(domains.PUBLIC_CHARS)
    for kind, items in texts.items():
        assert len(items) >= 3, kind  # several packages, not one big file
        assert 0.5 * domains.PUBLIC_CHARS[kind] < sum(map(len, items)) <= domains.PUBLIC_CHARS[kind], kind
        assert max(map(len, items)) <= domains.PUBLIC_TEXT_CHARS
        assert len(set(items)) == len(items), kind
    evaluated = {t.strip() for d in domains.EVAL_DOMAINS for t in d.load()}
    assert evaluated.isdisjoint(t for items in texts.values() for t in items)
    for module in domains.PUBLIC_MODULES + domains.DOC_PACKAGES:  # never the standard library (the code domain)
        assert module.split(".")[0] not in sys.stdlib_module_names, module
    assert not any("edge-runtime" in t or "edge_runtime" in t for t in texts["readmes"])  # ours changes per commit


def test_docstrings_span_packages_and_skip_short_ones(tmp_path):
    src = tmp_path / "m.py"
    long_doc = " ".join(["Explains how this works."] * 12)
    src.write_text(f'"""{long_doc}"""\n\nclass A:\n    """Short."""\n\n    def f(self):\n        """{long_doc}!"""\n')
    assert domains._docstrings(src) == [long_doc, long_doc + "!"]
    assert domains._round_robin([["a1", "a2", "a3"], ["b1"], []]) == ["a1", "b1", "a2", "a3"]
    first = domains.public_texts()["docs"][:40]
    owners = {p for p in domains.DOC_PACKAGES if set(first) & set(domains._package_docs(p, 10**5, set()))}
    assert len(owners) >= 5  # the first texts already come from several packages


@pytest.fixture(scope="module")
def tiny():
    from export.distill import load_teacher

    return load_teacher("tiny:llama")


def test_evaluation_domains_are_distinct_text(tiny):
    grams = {}
    for d in domains.EVAL_DOMAINS:
        ids = pack(d.load(), tiny.tokenizer, 1, tiny.eos_id).ravel()
        assert len(ids) > 2000, d.name
        grams[d.name] = ngrams(ids[None], 32)
    names = list(grams)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert len(grams[a] & grams[b]) < 0.01 * min(len(grams[a]), len(grams[b])), (a, b)


def test_prompts_mix_text_starts_and_chat_turns():
    prompts = synthetic_prompts(10, seed=1, chat=lambda q: f"<|user|>{q}<|assistant|>")
    chats = [p for p in prompts if p.startswith("<|user|>")]
    assert len(chats) == 5 and all(p[8:-13] in domains.CHAT_PROMPTS for p in chats)
    assert all(p in domains.TEXT_STARTS for p in prompts if p not in chats)
    assert synthetic_prompts(10, seed=1) == synthetic_prompts(10, seed=1)
    assert all(p in domains.TEXT_STARTS for p in synthetic_prompts(4, seed=0))


def test_teacher_writes_chat_answers_in_its_template(tiny):
    from export.distill import chat_renderer

    meta = tiny.source.tokenizer_meta
    texts = synthesize(tiny.model, tiny.tokenizer, 4, 12, seed=0, batch=4, pad_id=meta["pad_token_id"],
                       eos_ids=meta["eos_token_ids"], chat=chat_renderer(meta))
    prompts = synthetic_prompts(4, seed=0, chat=chat_renderer(meta))
    assert len(texts) == 4 and sum("<|im_start|>assistant" in t for t in texts) == 2
    for prompt, text in zip(prompts, texts):
        assert text.startswith(prompt)
        new = tiny.tokenizer.encode(text[len(prompt):]).ids
        assert len(text) > len(prompt) and not set(new) & set(meta["eos_token_ids"])


def test_report_scores_every_domain_and_chat(tiny):
    from export.distill.report import evaluate, format_report

    r = evaluate(tiny.model, tiny.model, tiny.tokenizer, tiny.source.tokenizer_meta, window=32, max_windows=2)
    assert list(r["domains"]) == [d.name for d in domains.EVAL_DOMAINS]
    for d in r["domains"].values():
        assert d["ppl_ratio"] == pytest.approx(1.0) and d["top1"] == 1.0 and d["eval_tokens"] == 64
    c = r["chat"]
    assert c["top1"] == 1.0 and c["kld"] == pytest.approx(0.0, abs=1e-9)
    assert c["greedy_match"] == 1.0 and c["identical"] == c["prompts"] == len(domains.EVAL_CHAT_PROMPTS)
    assert "| licenses |" in format_report(r) and np.isfinite(c["answer_tokens"])


def test_nucleus_keeps_what_top_p_over_the_whole_vocabulary_keeps():
    import torch
    from transformers import TopPLogitsWarper

    from export.distill.data import nucleus_processor

    scores = torch.randn(6, 5000) * torch.tensor([[0.5], [2.0], [4.0], [6.0], [8.0], [12.0]])  # flat .. peaked
    ids = torch.zeros((6, 1), dtype=torch.long)
    want = TopPLogitsWarper(0.95)(ids, scores.clone())
    got = nucleus_processor(0.95, k=5000)(ids, scores.clone())
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    assert torch.equal(got[torch.isfinite(got)], scores[torch.isfinite(got)])
    capped = torch.isfinite(nucleus_processor(0.95, k=64)(ids, scores.clone())).sum(-1)
    assert capped.max() <= 64 and torch.equal(capped[3:], torch.isfinite(want).sum(-1)[3:])


def test_teacher_text_past_its_deadline_stops_and_continues_to_the_same_texts(tiny):
    meta = tiny.source.tokenizer_meta
    kw = dict(seed=3, batch=2, pad_id=meta["pad_token_id"], eos_ids=meta["eos_token_ids"])
    whole = synthesize(tiny.model, tiny.tokenizer, 6, 8, **kw)
    first = synthesize(tiny.model, tiny.tokenizer, 6, 8, deadline=0.0, **kw)  # one batch, then out of time
    assert first == whole[:2]
    assert synthesize(tiny.model, tiny.tokenizer, 6, 8, done=first, **kw) == whole
