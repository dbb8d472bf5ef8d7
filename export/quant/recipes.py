"""Named recipes resolved, once per export, into a per-tensor plan: HF name -> QuantSpec (or None: fp32).

- `q4` (the default): every layer matmul at 4 bits (GGUF Q4 blocks transcoded exactly, float weights by the
  block search or GPTQ), the embedding / tied lm_head at 8 bits in blocks of 32. The lm_head is the one matmul
  whose 4-bit rounding the output sees undiluted; at 8 bits it stays faithful.
- `exact`: every tensor with GGUF blocks transcoded at its codes' width (4-bit codes -> int4, 5- to 8-bit
  -> int8, the attention projections' 8-bit blocks split into blocks of 16); weights without blocks at int8.
- `q8`: int8 everywhere (smoothed at accuracy level 4, see export.quant.smooth; the embedding / lm_head, not
  smoothed, transcoded exactly from symmetric GGUF blocks).
- `mixed`: int4 or int8 per matmul, the fewest bytes meeting --target-kld on calibration text
  (export.quant.sensitivity); its plan is what the search chose.
- `fp32`: no quantization.

After resolving, `refuse_idle_options` rejects options that change nothing in the plan (a --method when every
int4 tensor is transcoded, say), so a flag never does nothing silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from edge_runtime.spec import spec_for

from ..options import ExportOptions, OptionsError
from ..sources.source import SourceModel
from .quantize import QuantSpec, _fitting_block_size, _transcode_spec, preset_specs

VOCAB_NAMES = ("model.embed_tokens.weight", "lm_head.weight")
# q4's int8 vocabulary blocks: MatMulNBits rounds the lm_head's int8 input per block, and the output sees that
# rounding undiluted; 32 is also Q8_0's own block, so a Q8_0 table is kept exactly (fidelity and speed of 32
# against 64: bench/fidelity.py presets int4 and int4-vocab64)
Q4_VOCAB_BLOCK = 32
# recipe exact's layer units (spec.Layer roles) whose 8-bit GGUF blocks are split into blocks of 16 by default:
# small matmuls whose int8 input rounding goes into the attention scores and output; splitting the MLP's too
# costs more speed than it buys (bench/fidelity.py --model gemma3: presets exact, exact-b32, exact-b16)
EXACT_FINE_ROLES = ("q", "k", "v")


@dataclass(frozen=True)
class Plan:
    """The resolved recipe: the per-tensor specs and the calibration work they need (computed once)."""

    recipe: str
    specs: dict                 # HF name -> QuantSpec | None; for mixed: the int4 candidates
    act_aware: bool             # int4 search weights its error by calibration activation scales
    gptq: bool                  # some tensor is GPTQ-rounded (needs calibration input second moments)
    smooth: bool                # q8's SmoothQuant-style folding
    needs_float: bool           # the float model must be built (reference, evaluation or calibration)

    def requantized(self) -> list:
        """Names of tensors quantized from their float values (not transcoded)."""
        return [n for n, s in self.specs.items() if s is not None and s.method != "transcode"]

    def manifest(self) -> dict:
        """The plan as recorded in the manifest: recipe and, per quantized tensor, bits / block / method /
        offsets (a tensor left out stays fp32)."""
        return {"recipe": self.recipe,
                "tensors": {n: {"bits": s.bits, "block_size": s.block_size, "method": s.method, "offsets": s.offsets}
                            for n, s in self.specs.items() if s is not None}}


def vocab_spec(source: SourceModel, name: str, block: int) -> Optional[QuantSpec]:
    """int8 for a vocabulary matrix: blocks of `block` (fewer scales to read: the faster lm_head)."""
    bs = _fitting_block_size(source.config.hidden_size, block)
    return None if bs is None else QuantSpec(8, bs, "sym")


def exact_specs(source: SourceModel, block_size: int | None = None, vocab_block: int | None = None) -> dict:
    """Every tensor with GGUF blocks transcoded at its codes' width; other linear weights at int8.
    An 8-bit transcode split into blocks of 16 keeps the same values with finer int8 activations (MatMulNBits
    rounds its input per block): by default the units in EXACT_FINE_ROLES are split, the others kept in their
    GGUF blocks of 32; block_size 16 splits all of them, 32 none. vocab_block: the same choice for the
    embedding / lm_head alone (the largest matmul of a big-vocabulary model, so its scales cost the most bytes
    per token)."""
    if not source.gguf_blocks:
        raise OptionsError("recipe exact transcodes GGUF blocks, and this source has none (try q4 or q8)")
    built = {bs: preset_specs(source.config, "exact", source.gguf_blocks, block_size=bs) for bs in (32, 16)}
    split = {getattr(ly, role) for ly in spec_for(source.config).layers for role in EXACT_FINE_ROLES}
    default = {name: built[16][name] if name in split else spec for name, spec in built[32].items()}
    specs = default
    if block_size is not None:
        specs = built.get(block_size) or preset_specs(source.config, "exact", source.gguf_blocks,
                                                      block_size=block_size)
        if specs == default:
            raise OptionsError(f"--block-size {block_size} does nothing: recipe exact already keeps this source's "
                               f"8-bit GGUF blocks that way (or it has none to split)")
    if vocab_block is None:
        return specs
    vocab = {name: _transcode_spec(source.gguf_blocks[name], "exact", vocab_block)
             for name in VOCAB_NAMES if specs.get(name) is not None and name in source.gguf_blocks}
    if all(specs[name] == spec for name, spec in vocab.items()):
        raise OptionsError(f"--vocab-block {vocab_block} does nothing: the embedding / lm_head already has blocks "
                           f"of {vocab_block} (or no 8-bit GGUF blocks to split)")
    return {**specs, **vocab}


def q4_specs(source: SourceModel, opts: ExportOptions) -> dict:
    """int4 layer matmuls, int8 vocabulary matrices (an untied lm_head counts as a layer under --untie)."""
    specs = preset_specs(source.config, "int4", source.gguf_blocks, transcode=opts.transcode,
                         block_size=opts.weight_block, method=opts.int4_method, offsets=opts.offsets)
    vocab = ("model.embed_tokens.weight",) if opts.untie_embeddings else VOCAB_NAMES
    for name in vocab:
        if specs.get(name) is not None:
            blocks = source.gguf_blocks.get(name) if opts.transcode else None
            table_only = opts.untie_embeddings  # read a row per token: block size costs bytes, not speed
            block = opts.vocab_block or Q4_VOCAB_BLOCK
            if (table_only or block == 32) and blocks is not None and blocks.kind == "q8_0":
                specs[name] = _transcode_spec(blocks, "int8", 32)  # Q8_0's own blocks: its values exactly
            else:
                specs[name] = vocab_spec(source, name, block)
    return specs


def q8_specs(source: SourceModel, opts: ExportOptions) -> dict:
    """int8 everywhere; smoothed layers re-quantized (their columns are rescaled), the embedding / lm_head, which
    smoothing leaves alone, transcoded exactly when its GGUF blocks are symmetric (Q8_0, Q6_K, ...)."""
    blocks = source.gguf_blocks
    specs = preset_specs(source.config, "int8", blocks, transcode=opts.transcode and not opts.smoothing,
                         block_size=opts.weight_block, int8_method="asym" if opts.smoothing else "sym")
    if opts.smoothing and opts.transcode:
        for name in VOCAB_NAMES:
            if specs.get(name) is not None and name in blocks and blocks[name].m is None:
                specs[name] = _transcode_spec(blocks[name], "int8", opts.weight_block)
    return specs


def resolve(source: SourceModel, opts: ExportOptions) -> Plan:
    """The plan of validated `opts` on `source` (as loaded, or untied by --untie-embeddings: refuse_idle_untie
    checks that flag on the source as loaded); OptionsError for options that would change nothing."""
    refuse_source_mismatch(source, opts)
    cfg, blocks = source.config, source.gguf_blocks
    if opts.recipe == "fp32":
        specs = preset_specs(cfg, "fp32")
    elif opts.recipe == "exact":
        specs = exact_specs(source, opts.block_size, opts.vocab_block)
    elif opts.recipe == "q8":
        specs = q8_specs(source, opts)
    elif opts.recipe == "q4":
        specs = q4_specs(source, opts)
    else:  # mixed: the int4 candidates; the search picks int4 or int8 per matmul
        specs = preset_specs(cfg, "int4", blocks, transcode=opts.transcode, block_size=opts.weight_block,
                             method=opts.int4_method, offsets=opts.offsets)
    int4_found = [s for s in specs.values() if s is not None and s.bits == 4 and s.method != "transcode"]
    gptq = any(s.method == "gptq" for s in int4_found)
    act_aware = opts.act_aware and (opts.recipe == "mixed" or any(s.method == "search" for s in int4_found))
    needs_float = (opts.reference or opts.evaluate or opts.recipe == "mixed" or opts.smoothing or gptq or act_aware)
    plan = Plan(opts.recipe, specs, act_aware, gptq, opts.smoothing, needs_float)
    refuse_idle_options(plan, opts)
    return plan


def refuse_source_mismatch(source: SourceModel, opts: ExportOptions) -> None:
    """OptionsError for an option this source gives nothing to do."""
    if not opts.transcode and not source.gguf_blocks:
        raise OptionsError("--no-transcode does nothing: this source has no GGUF blocks")


def refuse_idle_untie(source: SourceModel, opts: ExportOptions) -> None:
    """OptionsError for --untie-embeddings on a source (as loaded) whose lm_head is not tied."""
    if opts.untie_embeddings and not source.config.tie_word_embeddings:
        raise OptionsError("--untie-embeddings does nothing: this model's lm_head is not tied")


def refuse_idle_options(plan: Plan, opts: ExportOptions) -> None:
    """OptionsError naming the first option the plan does not use."""
    int4 = [plan.specs[n] for n in plan.requantized() if plan.specs[n].bits == 4]
    hint = " (every int4 tensor is transcoded from GGUF blocks: add --no-transcode)" if not int4 else ""
    if opts.method is not None and not int4:
        raise OptionsError(f"--method does nothing for this source{hint}")
    if opts.offsets and not int4:
        raise OptionsError(f"--offsets does nothing for this source{hint}")
    if opts.method == "gptq" and not plan.gptq:
        raise OptionsError("--method gptq does nothing: no int4 matmul of this plan can be GPTQ-rounded")
    # exact_specs refuses a --block-size that changes nothing itself
    if opts.block_size is not None and not plan.requantized() and plan.recipe not in ("mixed", "exact"):
        raise OptionsError("--block-size does nothing: every tensor is transcoded from GGUF blocks or fp32")
    if not opts.act_aware and plan.recipe != "mixed" and not any(s.method == "search" for s in int4):
        raise OptionsError("--no-act-aware does nothing: no int4 tensor is found by the block search")
