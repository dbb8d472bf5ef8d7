"""Named recipes resolved into per-tensor plans; one options object validated for the CLI and the API alike."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from export.options import ExportOptions, OptionsError
from export.quant.recipes import Q4_VOCAB_BLOCK, resolve
from export.sources import load_source

EMBED = "model.embed_tokens.weight"
Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def tiny():
    return load_source("tiny:llama")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """tiny:llama written as a GGUF file: Q4_1 layers, a Q8_0 embedding, read back with its blocks."""
    from test_sources import write_gguf

    src = load_source("tiny:llama")
    qtype = lambda name: gguf.GGMLQuantizationType.Q8_0 if "embed" in name else gguf.GGMLQuantizationType.Q4_1  # noqa: E731
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", src, "llama", qtype)
    return load_source(str(path))


def plan_of(source, **kw):
    return resolve(source, ExportOptions(**kw).validated())


def test_recipes_resolve_to_per_tensor_specs(tiny):
    q4 = plan_of(tiny).specs
    assert q4[Q].bits == 4 and q4[Q].method == "search"
    assert (q4[EMBED].bits, q4[EMBED].block_size, q4[EMBED].method) == (8, Q4_VOCAB_BLOCK, "sym")
    assert all(s is None for n, s in q4.items() if n.endswith("norm.weight"))
    q8 = plan_of(tiny, recipe="q8").specs
    assert {s.bits for s in q8.values() if s is not None} == {8} and q8[Q].block_size == 16  # smoothed: blocks of 16
    assert all(s is None for s in plan_of(tiny, recipe="fp32").specs.values())
    assert plan_of(tiny, quant="int4").specs == q4 and plan_of(tiny, quant="auto").recipe == "mixed"
    gptq = plan_of(tiny, method="gptq")
    assert gptq.gptq and gptq.specs[Q].method == "gptq" and gptq.specs[EMBED].method == "sym"


def test_exact_and_q4_on_gguf_blocks(tiny_gguf):
    exact = plan_of(tiny_gguf, recipe="exact").specs
    assert exact[Q].method == "transcode" and exact[Q].bits == 4 and exact[Q].offsets
    assert (exact[EMBED].bits, exact[EMBED].method, exact[EMBED].block_size) == (8, "transcode", 32)
    finer = plan_of(tiny_gguf, recipe="exact", block_size=16).specs  # the Q8_0 table split, its Q4_1 kept
    assert finer[EMBED] == exact[EMBED].__class__(8, 16, "transcode") and finer[Q] == exact[Q]
    from export.quant.quantize import quantize_tensor

    whole, split = (quantize_tensor(EMBED, tiny_gguf.tensors[EMBED], s[EMBED], tiny_gguf.gguf_blocks)
                    for s in (exact, finer))
    assert np.array_equal(whole.dequantize(), split.dequantize())  # the same values, finer activation blocks
    layers_only = plan_of(tiny_gguf, recipe="exact", block_size=16, vocab_block=32).specs
    assert layers_only[EMBED] == exact[EMBED] and layers_only[Q] == finer[Q]
    assert plan_of(tiny_gguf, recipe="exact", vocab_block=16).specs[EMBED] == finer[EMBED]
    q4 = plan_of(tiny_gguf)
    assert q4.specs[Q] == exact[Q] and q4.specs[EMBED] == exact[EMBED] and not q4.act_aware  # Q8_0 as it is
    assert q4.requantized() == []
    coarse = plan_of(tiny_gguf, vocab_block=64)  # the int8 table re-quantized in blocks of 64
    assert coarse.specs[EMBED].method == "sym" and coarse.specs[EMBED].block_size == 64
    assert coarse.requantized() == [EMBED]
    assert plan_of(tiny_gguf, transcode=False, method="gptq").specs[Q].method == "gptq"
    q8 = plan_of(tiny_gguf, recipe="q8").specs  # smoothed layers re-quantized; the Q8_0 table, never smoothed, kept
    assert q8[Q].method == "asym" and (q8[EMBED].method, q8[EMBED].block_size) == ("transcode", 16)
    assert plan_of(tiny_gguf, recipe="q8", transcode=False).specs[EMBED].method == "asym"


def test_exact_splits_the_attention_projections_8bit_blocks_by_default(tmp_path):
    from test_sources import write_gguf

    src = load_source("tiny:llama")
    eight = ("embed", "v_proj", "gate_proj")  # Q8_0, the others Q4_1
    q8, q4_1 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1
    qtype = lambda name: q8 if any(e in name for e in eight) else q4_1  # noqa: E731
    source = load_source(str(write_gguf(tmp_path / "tiny.gguf", src, "llama", qtype)))
    v, gate = "model.layers.1.self_attn.v_proj.weight", "model.layers.1.mlp.gate_proj.weight"
    blocks = lambda specs: (specs[v].block_size, specs[gate].block_size, specs[EMBED].block_size)  # noqa: E731
    assert blocks(plan_of(source, recipe="exact").specs) == (16, 32, 32)
    assert blocks(plan_of(source, recipe="exact", block_size=16).specs) == (16, 16, 16)
    assert blocks(plan_of(source, recipe="exact", block_size=32).specs) == (32, 32, 32)
    assert plan_of(source, recipe="exact").specs[Q] == plan_of(source, recipe="exact", block_size=32).specs[Q]


@pytest.mark.parametrize("kw, message", [
    ({"method": "gptq"}, "--method does nothing for this source (every int4 tensor is transcoded"),
    ({"offsets": True}, "--offsets does nothing for this source"),
    ({"recipe": "exact", "block_size": 64}, "--block-size 64 does nothing: recipe exact already keeps"),
    ({"recipe": "exact", "block_size": 32}, "--block-size 32 does nothing: recipe exact already keeps"),
    ({"recipe": "exact", "vocab_block": 32}, "--vocab-block 32 does nothing: the embedding / lm_head already"),
])
def test_options_that_change_nothing_for_this_source_are_refused(tiny_gguf, kw, message):
    with pytest.raises(OptionsError, match=message.replace("(", r"\(")):
        plan_of(tiny_gguf, **kw)


@pytest.mark.parametrize("kw, message", [
    ({"method": "gptq", "offsets": True}, "--method gptq rounds onto integer zero points"),
    ({"target_kld": 0.01}, "--target-kld sets the mixed recipe's goal"),
    ({"recipe": "q8", "vocab_block": 16}, "--vocab-block sets the int8 embedding / lm_head of q4, mixed and exact"),
    ({"recipe": "exact", "vocab_block": 64}, "recipe exact keeps GGUF blocks of 32"),
    ({"smooth_alpha": 0.3}, "smoothing applies to the q8 recipe only"),
    ({"recipe": "fp32", "method": "rtn"}, "recipe fp32 rounds nothing to int4"),
    ({"max_kld": 0.0}, "--max-kld must be positive"),
    ({"recipe": "int3"}, "unknown recipe 'int3'"),
])
def test_contradictory_options_are_one_line_options_errors(kw, message):
    with pytest.raises(OptionsError, match=message) as e:
        ExportOptions(**kw).validated()
    assert "\n" not in str(e.value) and e.value.exit_code == 2


def test_source_dependent_refusals(tiny):
    with pytest.raises(OptionsError, match="this source has no GGUF blocks"):
        plan_of(tiny, transcode=False)
    with pytest.raises(OptionsError, match="recipe exact transcodes GGUF blocks, and this source has none"):
        plan_of(tiny, recipe="exact")


def test_api_default_options_export_and_record_the_plan(tmp_path):
    from export.pipeline import export_bundle

    out = export_bundle("tiny:llama", tmp_path / "b")
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    assert q["recipe"] == "q4" and q["tensors"][EMBED]["bits"] == 8 and q["tensors"][Q]["bits"] == 4
    with pytest.raises(OptionsError, match="cannot take --offsets"):
        export_bundle("tiny:llama", tmp_path / "c", ExportOptions(method="gptq", offsets=True))
    assert not (tmp_path / "c").exists()


def test_recipes_exported_together_equal_each_exported_alone(tmp_path):
    """export_bundles shares the source, float model and probes between recipes: the bundles (files and held-out
    figures) equal separate exports', so no recipe leaves a trace in what the next one reads."""
    from export.pipeline import export_bundle, export_bundles

    text = tmp_path / "eval.txt"
    text.write_text("The assignment statement binds names to objects; a loop repeats its body. " * 20)
    recipes = ["q8", "mixed", "q4"]  # smoothing, sensitivities and calibration all run the float model
    opts = {r: ExportOptions(recipe=r, threads=1, progress=False, eval_text=str(text), max_context=512).validated()
            for r in recipes}
    together = export_bundles("tiny:llama", [(tmp_path / f"together-{r}", opts[r]) for r in recipes])
    for recipe, out in zip(recipes, together):
        alone = export_bundle("tiny:llama", tmp_path / f"alone-{recipe}", opts[recipe])
        a, b = (json.loads((p / "manifest.json").read_text()) for p in (out, alone))
        assert a["files"] == b["files"] and a["fidelity"] == b["fidelity"], recipe
