"""The export pipeline, a straight line: options -> source -> per-tensor plan (export.quant.recipes) -> calibration ->
quantized weights -> graph -> float reference probes -> bundle -> fidelity on every evaluation domain (optional
--max-kld gate) -> atomic rename."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from edge_runtime.errors import FidelityError
from edge_runtime.spec import EMBED, LM_HEAD, supported

from .bundle.assets import bundle_contents, chat_encoder, tokenizer_of
from .options import MIXED_DEFAULT_KLD, ExportOptions
from .progress import Steps
from .quant.recipes import Plan, refuse_idle_untie, resolve
from .sources import SourceModel, load_source

__all__ = ["ExportOptions", "export_bundle", "export_bundles"]


def kv_dtypes_of(opts: ExportOptions) -> tuple[str, ...]:
    """The KV-cache precisions the bundle gets a graph for, the default first.

    Both by default: the graphs differ only in their KV inputs/outputs and rotary tables and share weights.bin,
    so the runtime can take the float32 cache (faster decode: ORT's float16 attention converts every key it
    reads) and the memory planner the float16 one (half the cache) when a budget needs it. --kv-dtype keeps
    just one.
    """
    from .graph.decoder import KV_DTYPES

    return (opts.kv_dtype,) if opts.kv_dtype else KV_DTYPES


def untie_embeddings(source: SourceModel) -> SourceModel:
    """The same model with its tied lm_head as a tensor of its own (same values, same GGUF blocks).

    Tied, one matrix serves two uses quantized alike: the lm_head, a matmul read whole every token, and the
    embedding table, read a row per token. Apart, each is quantized for its use (export.quant.recipes): the lm_head by
    the preset (GPTQ can then compensate its rounding, which it cannot do to a table whose rows are read alone), and
    the table at 8 bits, which costs bytes on disk but no per-token reads."""
    if not source.config.tie_word_embeddings:
        return source
    name = EMBED
    tensors = {**source.tensors, LM_HEAD: source.tensors[name]}
    blocks = dict(source.gguf_blocks)
    if name in blocks:
        blocks[LM_HEAD] = blocks[name]
    config = dataclasses.replace(source.config, tie_word_embeddings=False)
    return dataclasses.replace(source, tensors=tensors, gguf_blocks=blocks, config=config)


def reference_probes(source: SourceModel, ref) -> dict:
    """reference.json of `source`, from its float model `ref` (export.quality.reference.FloatReference)."""
    from .quality.probes import build_reference

    tok = tokenizer_of(source)
    return build_reference(ref, chat_encoder(source, tok), tok.encode, tok.eos_token_ids)


CALIBRATION_WINDOWS = 1  # calibration windows for activation scales and sensitivities (256 tokens each)
# smoothing statistics and GPTQ inputs: the per-channel activation RMS that sets the smoothing scales
# generalizes to other text better from 24 windows than from 6 (bench/fidelity.py --model gemma3 --only q8)
SMOOTH_WINDOWS = 24


def calibration_windows(source: SourceModel, k: int = CALIBRATION_WINDOWS) -> list[list[int]]:
    """k token windows of the calibration text (export.quality.eval_domains: never an evaluation source)."""
    from .quality import evaluate
    from .quality.eval_domains import calibration_text

    tok = tokenizer_of(source)
    return evaluate.calibration_windows(tok.encode(calibration_text()), k, bos=evaluate.window_bos(tok))


def smoothed_source(source: SourceModel, ref, alpha: float) -> tuple[SourceModel, dict]:
    """The source with export.quant.smooth folded in (an equivalent float model) and its manifest note.

    Smoothed tensors lose their GGUF blocks: they are re-quantized, not transcoded."""
    from .quant.sensitivity import activation_scales
    from .quant.smooth import KINDS, changed, smooth_decoder

    windows = calibration_windows(source, SMOOTH_WINDOWS)
    act = activation_scales(ref.torch_model, windows, source.config.tie_word_embeddings)
    tensors = smooth_decoder(source.tensors, source.config, act, alpha)
    moved = set(changed(source.tensors, tensors))
    blocks = {n: b for n, b in source.gguf_blocks.items() if n not in moved}
    note = {"alpha": alpha, "kinds": list(KINDS), "calibration_tokens": sum(map(len, windows))}
    return dataclasses.replace(source, tensors=tensors, gguf_blocks=blocks), note


def gptq_hessians(source: SourceModel, ref) -> dict:
    """HF name -> its matmul's input second moments [K, K] over the calibration windows."""
    from .quant.gptq import hessian_keys, input_hessians

    keys = hessian_keys(source.config)
    by_input = input_hessians(ref.torch_model, calibration_windows(source, SMOOTH_WINDOWS), keys)
    return {name: by_input[key] for name, key in keys.items() if key in by_input}


def calibrate(source: SourceModel, plan: Plan, ref) -> tuple[dict, dict]:
    """The calibration statistics the plan needs: (HF name -> activation RMS [K], HF name -> hessian [K, K])."""
    from .quant.sensitivity import activation_scales

    act = {}
    if plan.act_aware and plan.recipe != "mixed":  # mixed measures its own alongside the sensitivities
        act = activation_scales(ref.torch_model, calibration_windows(source), source.config.tie_word_embeddings)
    return act, (gptq_hessians(source, ref) if plan.gptq else {})


def quantize_planned(source: SourceModel, plan: Plan, act: dict, hessians: dict, log=lambda msg: None) -> dict:
    """HF name -> float array or BlockQuant, each tensor by its spec in the plan."""
    from .quant.quantize import quantize_tensor

    weights = {}
    for j, (name, w) in enumerate(source.tensors.items()):
        spec = plan.specs.get(name)
        if spec is None:
            weights[name] = w
            continue
        weights[name] = quantize_tensor(name, w, spec, source.gguf_blocks,
                                        act_scale=act.get(name) if spec.method == "search" else None,
                                        hessian=hessians.get(name) if spec.method == "gptq" else None)
        log(f"quantize {j + 1}/{len(source.tensors)} {name}")
    return weights


def quantize_mixed(source: SourceModel, plan: Plan, opts: ExportOptions, ref, hessians: dict,
                   log=lambda msg: None) -> tuple[dict, Plan, dict]:
    """The mixed recipe: int4 or int8 per matmul from measured sensitivities; the plan it chose."""
    from .quant.sensitivity import auto_quantize

    target = opts.target_kld or MIXED_DEFAULT_KLD
    qweights, specs, chosen = auto_quantize(
        source, ref.torch_model, calibration_windows(source), target, transcode=opts.transcode,
        method=opts.int4_method, offsets=opts.offsets, block_size=opts.weight_block, act_aware=plan.act_aware,
        cache_dir=opts.sensitivity_cache, hessians=hessians or None, vocab_block=opts.vocab_block, log=log)
    weights = {n: qweights.get(n, w) for n, w in source.tensors.items()}
    plan = dataclasses.replace(plan, specs={n: specs.get(n) for n in source.tensors})
    return weights, plan, {"target_kld": target, "auto": chosen.to_dict()}


def quantize_step(source: SourceModel, plan: Plan, opts: ExportOptions, ref, log=lambda msg: None):
    """(weights, the manifest `quantization` entry): the plan's tensors quantized, calibrated as it needs."""
    act, hessians = calibrate(source, plan, ref)
    notes = {}
    if plan.smooth:
        source, notes["smooth"] = smoothed_source(source, ref, 0.5 if opts.smooth_alpha is None else opts.smooth_alpha)
    if plan.recipe == "mixed":
        weights, plan, extra = quantize_mixed(source, plan, opts, ref, hessians, log)
        notes.update(extra)
    else:
        weights = quantize_planned(source, plan, act, hessians, log)
    table = plan.manifest()
    for name, entry in table["tensors"].items():
        q = weights[name]  # what was stored, which a transcode decides per tensor (not the spec)
        entry.update(zero_points=q.zero_points is not None, offsets=q.offsets is not None)
        if name in source.gguf_blocks:  # the GGUF type: transcoded, or re-quantized from it
            entry["gguf_type"] = source.gguf_blocks[name].kind
    return weights, {**table, "act_aware": plan.act_aware, "untied_embeddings": bool(opts.untie_embeddings),
                     **notes}


def evaluate_step(source: SourceModel, staging: Path, opts: ExportOptions, ref) -> dict:
    """The `fidelity` manifest entry of the staged bundle: every evaluation domain against the float model."""
    from .quality.evaluate import eval_sets, evaluate_bundle

    tok = tokenizer_of(source)
    sets = eval_sets(tok, chat_encoder(source, tok),
                     lambda ids, n: ref.greedy_batch(ids, n, eos_ids=tok.eos_token_ids), opts.eval_text)
    return evaluate_bundle(staging, ref.logits, sets, threads=opts.threads)


def check_fidelity(fidelity: dict, opts: ExportOptions) -> None:
    """The --max-kld gate on the worst domain: raise FidelityError (nothing is written) unless --force."""
    from .quality.evaluate import worst_domain

    name, h = worst_domain(fidelity)
    if opts.max_kld is None or h["kl"] <= opts.max_kld or opts.force:
        return
    raise FidelityError(f"the bundle is further from float than --max-kld {opts.max_kld:g}: KLD {h['kl']:.4f} "
                        f"(top-1 {100 * h['top1']:.1f}%) on {h['positions']} held-out tokens of {name}; nothing "
                        f"written (--force writes it anyway)")


def _set_manifest_key(bundle_dir: Path, key: str, value) -> None:
    """manifest.json is not in the manifest's own `files`: rewriting it (re-sealed) leaves every checksum valid."""
    from edge_runtime.format.bundle import MANIFEST, write_manifest

    manifest = json.loads((bundle_dir / MANIFEST).read_text(encoding="utf-8"))
    manifest[key] = value
    write_manifest(bundle_dir, manifest)


@dataclasses.dataclass
class Shared:
    """What exports of one source have in common, kept between them (export_bundles): the source as read, its
    float model and its reference probes, each made on first need. Every recipe reads them and none changes them
    (smoothing and untying make changed copies)."""
    source: SourceModel
    ref: Optional[object] = None         # export.quality.reference.FloatReference
    probes: Optional[dict] = None         # reference.json, the same for every recipe
    threads: Optional[int] = None         # what ref and probes were made with

    def float_model(self, threads: Optional[int]):
        from .quality.reference import FloatReference

        if self.ref is None or threads != self.threads:
            self.ref, self.probes, self.threads = FloatReference(self.source, threads=threads), None, threads
        return self.ref

    def reference(self, threads: Optional[int]) -> dict:
        ref = self.float_model(threads)
        if self.probes is None:
            self.probes = reference_probes(self.source, ref)
        return self.probes


def export_bundles(spec: str, jobs: list[tuple[Path, ExportOptions]]) -> list[Path]:
    """export_bundle for several (out_dir, options) of one source: it is read, its float model built and its
    reference probes computed once for all of them."""
    shared = Shared(load_source(spec))
    return [export_bundle(spec, out, opts, shared) for out, opts in jobs]


def export_bundle(spec: str, out_dir, opts: Optional[ExportOptions] = None, shared: Optional[Shared] = None) -> Path:
    """Export `spec` (GGUF path, HF folder or tiny:<arch>) to a bundle folder `out_dir`, atomically.

    opts (default ExportOptions()) are validated, then resolved once against the source into a per-tensor plan
    (export.quant.recipes); OptionsError for contradictory or idle options. The bundle is written to a staging folder
    next to out_dir, evaluated against the float model there (its manifest gains `fidelity`), and renamed into
    place only if it passes the --max-kld gate. shared: what an earlier export of the same source made (Shared).
    """
    from edge_runtime.format.contracts import DECODER as CONTRACT

    from .bundle.writer import _replace_dir, check_out_dir, write_bundle
    from .graph import GraphOptions, build_decoder_graph

    opts = (opts or ExportOptions()).validated()
    out_dir = Path(out_dir)
    check_out_dir(out_dir, opts.overwrite)
    steps = Steps(["load", "float model", "quantize", "graph", "reference", "write", "evaluate"], opts.progress)
    staging = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}"
    try:
        steps.start("load source")
        shared = shared or Shared(load_source(spec))
        source = shared.source
        refuse_idle_untie(source, opts)
        if opts.untie_embeddings:  # the same function: the float model and probes of `shared` still hold
            source = untie_embeddings(source)
        steps.done()
        if not supported(source.config.model_type):
            steps.close()
            from .optimum.fallback import export_fallback_bundle

            return export_fallback_bundle(source, out_dir, opts)
        plan = resolve(source, opts)
        steps.start("float model")
        ref = shared.float_model(opts.threads) if plan.needs_float else None
        steps.done()
        steps.start(f"quantize ({plan.recipe})")
        weights, quantization = quantize_step(source, plan, opts, ref, steps.start)
        steps.done()
        steps.start("build graph")
        max_context = int(opts.max_context or source.config.max_position_embeddings)
        graphs = {kv: build_decoder_graph(source.config, weights,
                                          GraphOptions(accuracy_level=opts.accuracy_level, max_context=max_context,
                                                       kv_dtype=kv))
                  for kv in kv_dtypes_of(opts)}                       # the default first
        # With int8 activations two executors agree only statistically (an ulp flips int8 roundings, which
        # compound); the same weights with float32 activations give them a graph to agree on to float rounding.
        exact = None if opts.accuracy_level == 0 or not quantization["tensors"] else build_decoder_graph(
            source.config, weights, GraphOptions(accuracy_level=0, max_context=max_context, kv_dtype="float32"))
        steps.done()
        steps.start("float reference probes")
        reference = shared.reference(opts.threads) if opts.reference else None
        steps.done()
        steps.start("write bundle")
        graph_fields = {"contract": CONTRACT, "accuracy_level": opts.accuracy_level}
        fields, extra = bundle_contents(source, graph_fields, quantization, max_context, reference, opts)
        write_bundle(staging, config=source.config, graphs=graphs, exact_graph=exact, manifest_fields=fields,
                     extra_files=extra)
        steps.done()
        steps.start("evaluate vs float on every domain")
        if opts.evaluate:
            fidelity = evaluate_step(source, staging, opts, ref)
            check_fidelity(fidelity, opts)
            _set_manifest_key(staging, "fidelity", fidelity)
        steps.done()
        _replace_dir(staging, out_dir, opts.overwrite)
        return out_dir
    except BaseException:
        remove_quietly(staging)
        raise
    finally:
        steps.close()


def remove_quietly(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
