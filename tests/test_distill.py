"""Distillation on a tiny random teacher: layer selection, MLP pruning, the top-k cache, KD training, resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_runtime.format.config import ModelConfig
from edge_runtime.spec import spec_for
from export.distill import data as ddata
from export.distill import train as dtrain
from export.distill.prune import block_influence, drop_layers, mlp_width, prune_mlp, select_layers
from export.distill.report import compare, heldout_windows
from export.distill.train import TrainConfig, batch_rows, ce_loss, kd_loss

SEQ = 32
SHARPEN = 20.0  # scales the final norm so the random teacher is confident (logit std ~3), like a trained LM


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(ddata.pydoc_split()[0][:20], trainer)
    return tok


def make_teacher_source(tok, layers: int = 4):
    """A random Llama (sharpened so its next-token distributions are far from uniform) as a SourceModel."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from export.quality.reference import hf_config_dict
    from export.sources import SourceModel

    cfg = ModelConfig(model_type="llama", vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=256,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=256, tie_word_embeddings=True)
    d = hf_config_dict(cfg)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")}))
    state = model.state_dict()
    scale = {"model.norm.weight": SHARPEN}
    tensors = {n: (state[n] * scale.get(n, 1.0)).numpy().copy() for n in spec_for(cfg).tensor_names()}
    meta = {"bos_token_id": None, "eos_token_ids": [0], "pad_token_id": 0, "special_tokens": {},
            "chat_template": None, "add_bos_token": False}
    return SourceModel(cfg, tensors, tok.to_str(), meta, {"format": "test"})


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def teacher(tok):
    from export.distill import load_teacher

    return load_teacher(make_teacher_source(tok))


@pytest.fixture(scope="module")
def rows(tok):
    return ddata.pack(ddata.pydoc_split()[0][:6], tok, SEQ, 0)[:48]


def test_kd_losses_vanish_for_identical_full_distributions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    top_logp, top_ids = torch.topk(torch.log_softmax(logits, -1), 11, dim=-1)
    for kind in ("fkl", "rkl", "jsd"):
        assert kd_loss(logits, top_ids, top_logp, 2.0, kind).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 5, 11)
    want = F.kl_div(torch.log_softmax(other, -1), torch.log_softmax(logits, -1), log_target=True,
                    reduction="none").sum(-1).mean()
    assert kd_loss(other, top_ids, top_logp, 1.0, "fkl").item() == pytest.approx(want.item(), rel=1e-5)
    t, s = torch.log_softmax(logits, -1), torch.log_softmax(other, -1)  # full k: no tail bucket
    want_rkl = (s.exp() * (s - t)).sum(-1).mean()
    m = torch.log((t.exp() + s.exp()) / 2)
    want_jsd = (0.5 * ((t.exp() * (t - m)).sum(-1) + (s.exp() * (s - m)).sum(-1))).mean()
    assert kd_loss(other, top_ids, top_logp, 1.0, "rkl").item() == pytest.approx(want_rkl.item(), rel=1e-5)
    assert kd_loss(other, top_ids, top_logp, 1.0, "jsd").item() == pytest.approx(want_jsd.item(), rel=1e-5)
    ids = torch.randint(0, 11, (2, 5))
    want_ce = F.cross_entropy(other[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    assert ce_loss(other, ids).item() == pytest.approx(want_ce.item(), rel=1e-6)


def test_kd_keeps_the_teachers_tail_mass():
    """With only the top 2 of 4 tokens cached, the student matching the full teacher is the optimum (loss 0)."""
    teacher = torch.log_softmax(torch.tensor([[[2.0, 1.0, 0.5, 0.4]]]), -1)
    top_logp, top_ids = torch.topk(teacher, 2, dim=-1)
    assert kd_loss(teacher, top_ids, top_logp, 1.0, "fkl").item() == pytest.approx(0.0, abs=1e-6)
    confident = torch.tensor([[[2.0, 1.0, -9.0, -9.0]]])  # all mass on the cached two: penalized
    assert kd_loss(confident, top_ids, top_logp, 1.0, "fkl").item() > 0.1


def test_block_influence_matches_hidden_states(teacher, rows):
    model = teacher.model
    ids = torch.from_numpy(rows[:2].astype(np.int64))
    bi = block_influence(model, [ids])
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    # hidden_states[i] enters layer i; the last entry is after the final norm, so compare all but the last layer
    for i in range(len(hs) - 2):
        want = (1 - F.cosine_similarity(hs[i], hs[i + 1], dim=-1)).mean()
        assert bi[i].item() == pytest.approx(want.item(), rel=1e-4)


def test_drop_layers_equals_a_model_built_from_the_kept_weights(teacher, rows):
    from transformers import LlamaForCausalLM

    keep = select_layers(teacher.model, [torch.from_numpy(rows[:4].astype(np.int64))], 2)
    assert len(keep) == 2 and keep == sorted(keep)
    assert teacher.model.config.num_hidden_layers == 4 and len(teacher.model.model.layers) == 4
    student = drop_layers(teacher.model, keep)
    conf = type(teacher.model.config)(**{**teacher.model.config.to_dict(), "num_hidden_layers": 2})
    ref = LlamaForCausalLM(conf)
    state = {}
    for name, t in teacher.model.state_dict().items():
        if ".layers." in name:
            i = int(name.split(".")[2])
            if i not in keep:
                continue
            name = name.replace(f".layers.{i}.", f".layers.{keep.index(i)}.")
        state[name] = t
    ref.load_state_dict(state)
    ids = torch.from_numpy(rows[:2].astype(np.int64))
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, ref.eval()(input_ids=ids).logits)


def test_prune_mlp_drops_exactly_the_dead_channels(teacher, rows):
    model = drop_layers(teacher.model, range(4))  # a private copy
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, 1::2] = 0.0  # odd channels contribute nothing
    ids = torch.from_numpy(rows[:2].astype(np.int64))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    prune_mlp(model, [ids], 0.5)
    assert model.config.intermediate_size == 128
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (128, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    assert mlp_width(1536, 0.7) == 1024 and mlp_width(1536, 1.0) == 1536


def test_cache_holds_teacher_topk_and_is_reused(teacher, rows, tmp_path, monkeypatch):
    cache = ddata.build_cache(teacher.model, rows[:6], tmp_path, k=8, batch=4, teacher_fp=teacher.fingerprint)
    with torch.no_grad():
        logp = torch.log_softmax(teacher.model(input_ids=torch.from_numpy(rows[:2].astype(np.int64))).logits, -1)
    want_vals, want_ids = torch.topk(logp, 8, dim=-1)
    np.testing.assert_array_equal(cache.top_ids[:2], want_ids.numpy())
    np.testing.assert_allclose(cache.top_logp[:2].astype(np.float32), want_vals.numpy(), rtol=2e-3, atol=2e-3)
    assert json.loads((cache.path / "index.json").read_text())["filled"] == 6

    def boom(*a, **k):
        raise AssertionError("the teacher ran again")

    monkeypatch.setattr(ddata, "_fill", boom)
    again = ddata.build_cache(teacher.model, rows[:6], tmp_path, k=8, teacher_fp=teacher.fingerprint)
    assert again.path == cache.path
    # a partial cache (crash after the first batch) is completed, not restarted
    monkeypatch.undo()
    index_file = cache.path / "index.json"
    index = json.loads(index_file.read_text())
    index["filled"] = 4
    index_file.write_text(json.dumps(index))
    np.save(cache.path / "done.npy", np.array([1, 1, 1, 1, 0, 0], dtype=np.uint8))
    calls = []
    real = teacher.model.forward
    monkeypatch.setattr(teacher.model, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    done = ddata.build_cache(teacher.model, rows[:6], tmp_path, k=8, batch=4, teacher_fp=teacher.fingerprint)
    assert len(calls) == 1
    np.testing.assert_array_equal(done.top_ids, cache.top_ids)


def test_bf16_teacher_cache_is_its_own_and_close_to_fp32(teacher, rows, tmp_path):
    fp = ddata.build_cache(teacher.model, rows[:4], tmp_path, k=8, teacher_fp=teacher.fingerprint)
    bf = ddata.build_cache(teacher.model, rows[:4], tmp_path, k=8, teacher_fp=teacher.fingerprint, precision="bf16")
    assert bf.path != fp.path and json.loads((bf.path / "index.json").read_text())["precision"] == "bf16"
    assert not np.array_equal(bf.top_logp, fp.top_logp)  # the forward did run in bf16
    with torch.no_grad():
        logp = torch.log_softmax(teacher.model(input_ids=torch.from_numpy(rows[:4].astype(np.int64))).logits, -1)
    # the bf16 targets, as the fp32 teacher's divergence from them: a small fraction of the teacher's entropy
    gap = dtrain.kd_from_logp(logp, torch.from_numpy(bf.top_ids.astype(np.int64)),
                              torch.from_numpy(bf.top_logp.astype(np.float32)), 1.0)
    entropy = -(logp.exp() * logp).sum(-1).mean()
    assert 0.0 <= gap < 0.01 * entropy
    assert (bf.top_ids[..., 0] == fp.top_ids[..., 0]).mean() > 0.9


def test_ranks_filling_one_after_another_cover_every_row(teacher, rows, tmp_path):
    # a rank that starts late deals from the same rows as one that already marked some done (the rows are
    # read before any rank fills): every row is filled once, whatever the ranks' timing
    fp = teacher.fingerprint
    path = tmp_path / ddata.cache_key(fp, rows[:10], 8)
    ddata._create(path, rows[:10], 8, fp, "fp32")
    index = json.loads((path / "index.json").read_text())
    todo = np.flatnonzero(np.load(path / "done.npy") == 0)
    for rank in (0, 1):  # rank 0 finishes its share before rank 1 starts
        ddata._fill(teacher.model, path, index, todo, 2, ddata.Dist(rank=rank, world=2), "fp32")
    assert np.load(path / "done.npy").all()


def test_batches_cover_each_epoch_once():
    seen = np.concatenate([batch_rows(10, 4, s, seed=3) for s in range(5)])  # 20 rows = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    np.testing.assert_array_equal(batch_rows(10, 4, 2, seed=3), batch_rows(10, 4, 2, seed=3))


def _student(teacher, rows):
    return drop_layers(teacher.model, select_layers(teacher.model, [torch.from_numpy(rows[:8].astype(np.int64))], 2))


def _kld(teacher, student, windows) -> float:
    return compare(teacher.model, student, windows)["kld"]


def test_training_lowers_loss_and_kld(teacher, rows, tok, tmp_path):
    cache = ddata.build_cache(teacher.model, rows, tmp_path / "cache", k=16, teacher_fp=teacher.fingerprint)
    student = _student(teacher, rows)
    windows = heldout_windows(tok, 0, window=SEQ, max_windows=8)
    kld0 = _kld(teacher, student, windows)
    cfg = TrainConfig(steps=40, batch_size=4, lr=3e-3, warmup_steps=2, temperature=1.0, alpha=1.0)
    state = dtrain.train(student, cache, cfg, tmp_path / "run", progress=False)
    losses = np.array([h[1] for h in state["history"]])
    assert losses[-5:].mean() < 0.8 * losses[:5].mean()
    assert _kld(teacher, student, windows) < 0.8 * kld0


def test_bf16_training_follows_the_fp32_run(teacher, rows, tmp_path):
    """Autocast changes the arithmetic, not the algorithm: the same steps from the same student stay close to the
    fp32 run's losses and weights, and still lower the loss."""
    cache = ddata.build_cache(teacher.model, rows, tmp_path / "cache", k=16, teacher_fp=teacher.fingerprint)
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(steps=12, batch_size=4, lr=3e-3, warmup_steps=2, temperature=1.0, alpha=1.0,
                          precision=precision)
        student = _student(teacher, rows)
        state = dtrain.train(student, cache, cfg, tmp_path / precision, progress=False)
        runs[precision] = (np.array([h[1] for h in state["history"]]), student)
    (l32, s32), (l16, s16) = runs["fp32"], runs["bf16"]
    assert not np.array_equal(l16, l32)  # bf16 arithmetic did run
    np.testing.assert_allclose(l16, l32, rtol=0.05)
    assert l16[-3:].mean() < 0.8 * l16[:3].mean()
    w32, w16 = s32.model.layers[0].mlp.up_proj.weight, s16.model.layers[0].mlp.up_proj.weight
    assert w16.dtype == torch.float32  # master weights stay fp32
    moved = (w32 - _student(teacher, rows).model.layers[0].mlp.up_proj.weight).norm()
    assert (w16 - w32).norm() < 0.2 * moved


def test_precision_auto_resolves_to_a_supported_one():
    from export.distill.precision import PRECISIONS, resolve_precision

    assert resolve_precision("auto", "cpu") in PRECISIONS
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", "cpu")


def test_resume_after_a_crash_matches_an_uninterrupted_run(teacher, rows, tmp_path, monkeypatch):
    cache = ddata.build_cache(teacher.model, rows, tmp_path / "cache", k=16, teacher_fp=teacher.fingerprint)
    cfg = TrainConfig(steps=8, batch_size=4, lr=1e-3, warmup_steps=2, alpha=0.5, checkpoint_every=3)
    whole = _student(teacher, rows)
    dtrain.train(whole, cache, cfg, tmp_path / "whole", progress=False)

    real_step = dtrain.train_step

    def crash_at_5(model, opt, cache_, cfg_, step, *rest):
        if step == 5:
            raise KeyboardInterrupt
        return real_step(model, opt, cache_, cfg_, step, *rest)

    monkeypatch.setattr(dtrain, "train_step", crash_at_5)
    with pytest.raises(KeyboardInterrupt):
        dtrain.train(_student(teacher, rows), cache, cfg, tmp_path / "split", progress=False)
    monkeypatch.undo()
    blob = torch.load(tmp_path / "split" / dtrain.CHECKPOINT, weights_only=True)
    assert blob["step"] == 3 and blob["optimizer"]["state"]
    resumed = _student(teacher, rows)
    state = dtrain.train(resumed, cache, cfg, tmp_path / "split", progress=False)
    assert state["step"] == 8 and [h[0] for h in state["history"]] == list(range(1, 9))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_evaluation_text_is_never_trained_on(teacher, tok, tmp_path):
    from export.distill import training_rows
    from export.distill.domains import CHAT_PROMPTS, EVAL_DOMAINS, TEXT_STARTS

    own = tmp_path / "own.txt"
    own.write_text("\n".join(TEXT_STARTS + CHAT_PROMPTS) * 3)
    leak = tmp_path / "leak.txt"
    leak.write_text("".join("Some harmless words. " * 40 + d.load()[-1][:3000] for d in EVAL_DOMAINS))
    clean = training_rows(teacher, [own], SEQ, seed=0, cache_root=tmp_path, synthetic_samples=0,
                          synthetic_tokens=0)
    rows_ = training_rows(teacher, [own, leak], SEQ, seed=0, cache_root=tmp_path, synthetic_samples=0,
                          synthetic_tokens=0)
    every = ddata.pack([leak.read_text()], tok, SEQ, 0)
    assert len(rows_) < len(clean) + len(every) // 2  # most of the leaked rows were dropped ...
    for d in EVAL_DOMAINS:  # ... and what is left shares no 32 tokens with any evaluation domain
        held = ddata.pack(d.load(), tok, 1, 0).ravel()
        assert not ddata.overlapping_rows(rows_, held).any(), d.name
    assert len(clean) > 20


def test_given_heldout_texts_replace_the_evaluation_domains(teacher, tok, tmp_path):
    """The in-domain ceiling trains on most of pydoc topics: only its held-out tail is kept out of training."""
    from export.distill import training_rows

    train_texts, tail = ddata.pydoc_split()
    data = tmp_path / "pydoc.txt"
    data.write_text("\n\n".join(train_texts[:4] + tail[:2]))
    rows_ = training_rows(teacher, [data], SEQ, seed=0, cache_root=tmp_path, synthetic_samples=0,
                          synthetic_tokens=0, heldout=tail)
    every = ddata.pack([data.read_text()], tok, SEQ, 0)
    assert not ddata.overlapping_rows(rows_, ddata.pack(tail, tok, 1, 0).ravel()).any()
    assert ddata.overlapping_rows(every, ddata.pack(tail[:2], tok, 1, 0).ravel()).any()  # the tail was there
    assert len(rows_) > 0.5 * len(every)  # the training part stays, though it is evaluation-domain text


def test_distill_end_to_end_writes_a_loadable_student(teacher, tok, tmp_path):
    from export.distill import distill
    from export.sources import load_source

    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(ddata.pydoc_split()[0][:3]))
    out = distill(teacher.source, layers=2, mlp_ratio=0.5, data=["synthetic", text], steps=6, seq_len=SEQ,
                  batch_size=4, top_k=16, out_dir=tmp_path / "student", cache_dir=tmp_path / "cache",
                  synthetic_samples=4, synthetic_tokens=24, progress=False)
    src = load_source(str(out))
    assert src.config.num_hidden_layers == 2 and src.config.intermediate_size == 128
    plan = json.loads((out / "distill.json").read_text())
    assert plan["steps_done"] == 6 and len(plan["keep"]) == 2
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).exists()


def test_report_of_a_model_against_itself(teacher, tok):
    from export.distill import report

    logits, ids = np.log(np.full((3, 4), 0.25)), np.array([0, 1, 2])
    assert report.nll_sum(logits, ids) == pytest.approx(2 * np.log(4), rel=1e-12)  # two predictions at p = 1/4
    same = report.compare(teacher.model, teacher.model, heldout_windows(tok, 0, window=SEQ, max_windows=2))
    assert len(heldout_windows(tok, 0, window=SEQ, max_windows=2)) == 2
    assert same["ppl_ratio"] == pytest.approx(1.0) and same["kld"] == pytest.approx(0.0, abs=1e-9)
    assert same["top1"] == 1.0 and same["teacher_params"] == same["student_params"]


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_layer_pruning_works_beyond_llama(arch):
    from export.distill import load_teacher

    t = load_teacher(f"tiny:{arch}")
    ids = torch.from_numpy(np.arange(3, 27, dtype=np.int64))[None]  # [1, 24]
    with torch.no_grad():
        same = drop_layers(t.model, [0, 1])
        torch.testing.assert_close(same(input_ids=ids).logits, t.model(input_ids=ids).logits, rtol=0, atol=0)
        one = drop_layers(t.model, [1])
        assert one.model.layers[0].self_attn.layer_idx == 0 and len(one.model.layers) == 1
        assert len(getattr(one.config, "layer_types", None) or [0]) == 1
        assert one(input_ids=ids).logits.shape == (1, 24, t.model.config.vocab_size)
    assert t.model.config.num_hidden_layers == 2  # the teacher is untouched


def test_a_gemma3_student_keeps_its_layers_kinds(tmp_path):
    """A student cut from a Gemma 3 teacher (sliding-window layers and a global one) is saved with the kinds of
    the layers it kept, and loads back as the exporter's source."""
    from export.distill import load_teacher, save_student
    from export.sources import load_source

    t = load_teacher("tiny:gemma3")
    assert t.source.config.layer_types == ("sliding_attention", "sliding_attention", "full_attention")
    student = drop_layers(t.model, [1, 2])
    save_student(student, t, tmp_path, {"keep": [1, 2]})
    src = load_source(str(tmp_path))
    assert src.config.num_hidden_layers == 2
    assert src.config.layer_types == ("sliding_attention", "full_attention")
