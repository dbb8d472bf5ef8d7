"""The export pipeline: source -> quantized weights -> graph -> float reference probes -> bundle -> fidelity
(held-out evaluation against the float model, optional --max-kld gate) -> atomic rename."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from edge_runtime.chat import render
from edge_runtime.config import LLAMA_FAMILY
from edge_runtime.errors import EdgeError, FidelityError
from edge_runtime.tokenizer import Tokenizer

from .sources import SourceModel, load_source


@dataclass
class ExportOptions:
    quant: str = "int4"
    accuracy_level: int = 4          # MatMulNBits activations: 4 = int8 (fast VNNI path), 0 = fp32
    block_size: Optional[int] = None  # weight blocks (and MatMulNBits' int8 activation blocks); None: see below
    method: str = "search"           # int4 scale/zero-point choice for float weights: search | gptq | rtn
    offsets: bool = False            # int4 of float weights: per-block float offsets (asymmetric float minimum)
    transcode: bool = True           # GGUF Q4_0/Q4_1/Q8_0 blocks are transcoded exactly instead of re-quantized
    max_context: Optional[int] = None
    kv_dtype: Optional[str] = None   # KV cache precision; default: both (kv_dtypes_of)
    threads: int = 2
    reference: bool = True           # store the float model's probes (reference.json)
    evaluate: bool = True            # measure fidelity on held-out text (manifest `fidelity`)
    eval_text: Optional[str] = None  # held-out text file (default: CPython's pydoc topics)
    max_kld: Optional[float] = None  # fail when the bundle's held-out KLD exceeds this (and: auto's target)
    force: bool = False              # write the bundle even when it misses max_kld
    act_aware: bool = True           # int4 of float weights: weight the error by calibration activations
    smooth: Optional[bool] = None    # int8: fold per-channel activation scales into norms / up / v (export.smooth);
                                     # default: on for int8 at accuracy_level 4 (see smooth_of)
    smooth_alpha: float = 0.5        # SmoothQuant's migration strength (export.smooth.DEFAULT_ALPHA)
    sensitivity_cache: Optional[str] = None  # folder caching quant=auto's per-matmul sensitivities
    untie_embeddings: bool = False   # a tied lm_head stored apart from the embedding table (untie_embeddings)
    vocab_block: Optional[int] = None  # auto: block size of the embedding / lm_head int8 candidate (default 64)
    progress: bool = True
    overwrite: bool = False          # replace a bundle already at the output path (never anything else)
    extra_manifest: dict = field(default_factory=dict)

    def __post_init__(self):
        # Smoothed int8 uses blocks of 16: finer int8 activations, and the smoothed weights' rounding too (held-out
        # KLD 0.0020 -> 0.0012 on SmolLM2-135M, 1.04x the bytes of the transcoded int8, decode not slower).
        if self.block_size is None:
            self.block_size = 16 if smooth_of(self) else 32


def smooth_of(opts: "ExportOptions") -> bool:
    """Smoothing only pays where MatMulNBits rounds activations to int8 (accuracy_level 4); there it takes the
    int8 preset's held-out KLD on SmolLM2-135M from 0.0036 to 0.0012 (with blocks of 16; the layers are then
    re-quantized to int8 with zero points instead of transcoded, about 0.0003 of that). Not for int4/auto:
    their weight error dominates."""
    if opts.smooth is None:
        return opts.quant == "int8" and opts.accuracy_level == 4
    return bool(opts.smooth)


def kv_dtypes_of(opts: "ExportOptions") -> tuple[str, ...]:
    """The KV-cache precisions the bundle gets a graph for, the default first.

    Both by default: the graphs differ only in their KV inputs/outputs and rotary tables and share weights.bin,
    so the runtime can take the float32 cache (decode 1.2-1.3x faster for SmolLM2 int4: ORT's float16
    attention converts every key it reads) and the memory planner the float16 one (half the cache: 45 MB
    instead of 90 at context 2048) when a budget needs it. --kv-dtype keeps just one.
    """
    from .graph.llama import KV_DTYPES

    return (opts.kv_dtype,) if opts.kv_dtype else KV_DTYPES


class Steps:
    """Progress on stderr: one tqdm bar over the pipeline's steps on a terminal, only the log lines elsewhere
    (quiet when progress is off)."""

    def __init__(self, names, enabled: bool):
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():  # a bar redrawn into a log file or pipe is one line per redraw
            from tqdm import tqdm

            self.bar = tqdm(total=len(names), desc="export", unit="step", file=sys.stderr, leave=True,
                            bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}] {postfix}")
        self.t0 = time.perf_counter()

    def start(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(name)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, msg: str) -> None:
        """A line on stderr that does not break the bar (silent when progress is off)."""
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        elif self.enabled:
            print(msg, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def tokenizer_of(source: SourceModel) -> Tokenizer:
    meta = source.tokenizer_meta
    return Tokenizer.from_json(source.tokenizer_json, "tokenizers", bos_token_id=meta.get("bos_token_id"),
                               eos_token_ids=meta.get("eos_token_ids") or (),
                               add_bos_token=meta.get("add_bos_token", False))


def chat_encoder(source: SourceModel, tok: Tokenizer):
    meta = source.tokenizer_meta

    def encode_chat(text: str) -> list[int]:
        if not meta.get("chat_template"):
            return tok.encode(text)
        prompt = render(meta["chat_template"], [{"role": "user", "content": text}], meta.get("special_tokens"))
        return tok.encode(prompt, add_bos=False)

    return encode_chat


def untie_embeddings(source: SourceModel) -> SourceModel:
    """The same model with its tied lm_head as a tensor of its own (same values, same GGUF blocks).

    Tied, one matrix serves two uses quantized alike: the lm_head, a matmul read whole every token, and the
    embedding table, read a row per token. Apart, each is quantized for its use (specs_of): the lm_head by the
    preset (GPTQ can then compensate its rounding, which it cannot do to a table whose rows are read alone), and
    the table at 8 bits, which costs bytes on disk but no per-token reads."""
    if not source.config.tie_word_embeddings:
        return source
    name = "model.embed_tokens.weight"
    tensors = {**source.tensors, "lm_head.weight": source.tensors[name]}
    blocks = dict(source.gguf_blocks)
    if name in blocks:
        blocks["lm_head.weight"] = blocks[name]
    config = dataclasses.replace(source.config, tie_word_embeddings=False)
    return dataclasses.replace(source, tensors=tensors, gguf_blocks=blocks, config=config)


def specs_of(source: SourceModel, opts: ExportOptions, int8_method: str = "sym") -> dict:
    """HF name -> QuantSpec (or None) under the options; an untied embedding table is kept at 8 bits."""
    from .quantize import QuantSpec, _fitting_block_size, _transcode_spec, preset_specs

    specs = preset_specs(source.config, opts.quant, source.gguf_blocks, transcode=opts.transcode,
                         block_size=opts.block_size, method=opts.method, offsets=opts.offsets,
                         int8_method=int8_method)
    name = "model.embed_tokens.weight"
    spec = specs.get(name)
    if opts.untie_embeddings and spec is not None and spec.bits == 4:
        blocks = source.gguf_blocks.get(name) if opts.transcode else None
        if blocks is not None and blocks.kind == "q8_0":
            specs[name] = _transcode_spec(blocks, "int8", 32)
        else:  # blocks of up to 32: the table is read a row at a time, so its block size costs bytes, not speed
            specs[name] = QuantSpec(8, _fitting_block_size(source.config.hidden_size, 32), "sym")
    return specs


def quantize_weights(source: SourceModel, opts: ExportOptions, bar=None,
                     act_scales: Optional[dict] = None, hessians: Optional[dict] = None) -> tuple[dict, dict]:
    """HF name -> float array or BlockQuant, and the manifest's per-tensor quantization table.

    act_scales: HF name -> activation RMS per input channel [K] (int4 search weights its error by them).
    hessians: HF name -> input second moments [K, K] of the tensors quantized by method gptq (gptq_hessians).
    """
    from .quantize import quantize_tensor

    specs = specs_of(source, opts, int8_method="asym" if smooth_of(opts) else "sym")
    weights, table = {}, {}
    for name, w in source.tensors.items():
        spec = specs.get(name)
        if spec is None:
            weights[name] = w
            continue
        act = (act_scales or {}).get(name) if spec.method == "search" else None
        hess = (hessians or {}).get(name) if spec.method == "gptq" else None
        q = quantize_tensor(name, w, spec, source.gguf_blocks, act_scale=act, hessian=hess)
        weights[name] = q
        table[name] = {"bits": q.bits, "block_size": q.block_size, "method": spec.method,
                       "zero_points": q.zero_points is not None, "offsets": q.offsets is not None}
        if name in source.gguf_blocks:  # which GGUF type it came from: transcoded, or re-quantized from floats
            table[name]["gguf_type"] = source.gguf_blocks[name].kind
        if bar is not None:
            bar.set_postfix_str(f"quantize {name}")
    return weights, table


def tokenizer_manifest(source: SourceModel) -> dict:
    meta = source.tokenizer_meta
    return {"file": "tokenizer.json", "bos_token_id": meta.get("bos_token_id"),
            "eos_token_ids": list(meta.get("eos_token_ids") or []), "pad_token_id": meta.get("pad_token_id"),
            "special_tokens": dict(meta.get("special_tokens") or {}), "chat_template": meta.get("chat_template"),
            "add_bos_token": bool(meta.get("add_bos_token", False))}


def bundle_contents(source: SourceModel, graph_fields: dict, quantization: dict, max_context: int,
                    reference: Optional[dict], opts: ExportOptions) -> tuple[dict, dict]:
    """The manifest keys the exporter owns, and the bundle's files besides the graph and weights."""
    fields = {
        "architecture": source.config.model_type,
        "graph": graph_fields,
        "quantization": quantization,
        "tokenizer": tokenizer_manifest(source),
        "max_context": max_context,
        "source": {k: (str(v) if isinstance(v, Path) else v) for k, v in source.origin.items()},
        **opts.extra_manifest,
    }
    extra = {"tokenizer.json": source.tokenizer_json}
    if reference is not None:
        fields["reference"] = {"file": "reference.json"}
        extra["reference.json"] = json.dumps(reference)
    return fields, extra


def reference_probes(source: SourceModel, threads: int, ref=None) -> dict:
    """reference.json of `source` (ref: an export.reference.FloatReference to reuse)."""
    from .probes import build_reference
    from .reference import FloatReference

    tok = tokenizer_of(source)
    ref = ref or FloatReference(source, threads=threads)
    return build_reference(ref, chat_encoder(source, tok), tok.encode, tok.eos_token_ids)


AUTO_DEFAULT_KLD = 0.02  # quant=auto's KLD target when --max-kld is not given
CALIBRATION_WINDOWS = 1  # calibration: 1 x 256 tokens of pydoc topics, between the evaluation windows
SMOOTH_WINDOWS = 6       # smoothing statistics: all 6 windows between the evaluation windows (1,536 tokens)


def calibration_windows(source: SourceModel, k: int = CALIBRATION_WINDOWS) -> list[list[int]]:
    from . import evaluate

    ids = tokenizer_of(source).encode(evaluate.default_eval_text())
    return evaluate.calibration_windows(ids, k)


def smoothed_source(source: SourceModel, ref, opts: ExportOptions) -> tuple[SourceModel, dict]:
    """The source with export.smooth folded in (an equivalent float model) and its manifest note.

    Smoothed tensors lose their GGUF blocks: they are re-quantized, not transcoded."""
    from .sensitivity import activation_scales
    from .smooth import KINDS, changed, smooth_llama

    windows = calibration_windows(source, SMOOTH_WINDOWS)
    act = activation_scales(ref.torch_model, windows, source.config.tie_word_embeddings)
    tensors = smooth_llama(source.tensors, source.config, act, opts.smooth_alpha)
    moved = set(changed(source.tensors, tensors))
    blocks = {n: b for n, b in source.gguf_blocks.items() if n not in moved}
    note = {"alpha": opts.smooth_alpha, "kinds": list(KINDS), "calibration_tokens": sum(map(len, windows))}
    return dataclasses.replace(source, tensors=tensors, gguf_blocks=blocks), note


def _needs_float_weights_search(source: SourceModel, opts: ExportOptions) -> bool:
    if opts.quant == "auto":
        return True
    specs = specs_of(source, opts)
    return any(s is not None and s.method in ("search", "gptq") for s in specs.values())


def gptq_hessians(source: SourceModel, ref, opts: ExportOptions) -> Optional[dict]:
    """HF name -> its matmul's input second moments over the smoothing windows (1,536 calibration tokens,
    disjoint from the evaluation's), when some int4 weight (of the preset, or of auto's int4 candidates) is
    quantized by method gptq; else None."""
    from .gptq import hessian_keys, input_hessians
    from .quantize import preset_specs

    if ref is None or opts.method != "gptq" or opts.quant not in ("int4", "auto"):
        return None
    specs = preset_specs(source.config, "int4", source.gguf_blocks, transcode=opts.transcode,
                         block_size=opts.block_size, method="gptq")
    if not any(s is not None and s.method == "gptq" for s in specs.values()):  # all transcoded, say
        return None
    keys = hessian_keys(source.config)
    by_input = input_hessians(ref.torch_model, calibration_windows(source, SMOOTH_WINDOWS), keys)
    return {name: by_input[key] for name, key in keys.items() if key in by_input}


def quantize_step(source: SourceModel, opts: ExportOptions, ref, log=lambda msg: None) -> tuple[dict, dict]:
    """Weights and the manifest `quantization` entry: a preset, or quant=auto's sensitivity-driven mix."""
    act_aware = opts.act_aware and ref is not None and _needs_float_weights_search(source, opts)
    if opts.quant != "auto":
        act, smooth = None, None
        if act_aware:
            from .sensitivity import activation_scales

            act = activation_scales(ref.torch_model, calibration_windows(source), source.config.tie_word_embeddings)
        if smooth_of(opts):
            source, smooth = smoothed_source(source, ref, opts)
        weights, table = quantize_weights(source, opts, act_scales=act, hessians=gptq_hessians(source, ref, opts))
        out = {"preset": opts.quant, "tensors": table, "act_aware": bool(act_aware),
               "untied_embeddings": bool(opts.untie_embeddings)}
        return weights, (out if smooth is None else {**out, "smooth": smooth})
    from .sensitivity import auto_quantize

    target = opts.max_kld if opts.max_kld is not None else AUTO_DEFAULT_KLD
    qweights, specs, plan = auto_quantize(
        source, ref.torch_model, calibration_windows(source), target, transcode=opts.transcode,
        method=opts.method, offsets=opts.offsets, block_size=opts.block_size, act_aware=act_aware,
        cache_dir=opts.sensitivity_cache, hessians=gptq_hessians(source, ref, opts), vocab_block=opts.vocab_block,
        log=log)
    weights = {n: qweights.get(n, w) for n, w in source.tensors.items()}
    table = {n: q.manifest_entry(specs[n].method) for n, q in qweights.items()}
    return weights, {"preset": "auto", "tensors": table, "act_aware": bool(act_aware), "target_kld": target,
                     "auto": plan.to_dict()}


def evaluate_step(source: SourceModel, staging: Path, opts: ExportOptions, ref) -> dict:
    """The `fidelity` manifest entry of the staged bundle (held-out text vs the float reference)."""
    from .evaluate import cached, evaluate_bundle, read_eval_text, token_windows

    text, name = read_eval_text(opts.eval_text)
    windows = token_windows(tokenizer_of(source).encode(text))
    return evaluate_bundle(staging, cached(ref.logits), windows, text_name=name, threads=opts.threads)


def check_fidelity(fidelity: dict, opts: ExportOptions) -> None:
    """The --max-kld gate: raise FidelityError (nothing is written) unless --force."""
    h = fidelity["heldout"]
    if opts.max_kld is None or h["kl"] <= opts.max_kld or opts.force:
        return
    raise FidelityError(f"the bundle is further from float than --max-kld {opts.max_kld:g}: KLD {h['kl']:.4f} "
                        f"(top-1 {100 * h['top1']:.1f}%) on {h['positions']} held-out tokens; nothing written "
                        f"(--force writes it anyway)")


def _set_manifest_key(bundle_dir: Path, key: str, value) -> None:
    """manifest.json is not in the manifest's own `files`: rewriting it (re-sealed) leaves every checksum valid."""
    from edge_runtime.bundle import MANIFEST, write_manifest

    manifest = json.loads((bundle_dir / MANIFEST).read_text(encoding="utf-8"))
    manifest[key] = value
    write_manifest(bundle_dir, manifest)


def export_bundle(spec: str, out_dir, opts: Optional[ExportOptions] = None) -> Path:
    """Export `spec` (GGUF path, HF folder or tiny:<arch>) to a bundle folder `out_dir`, atomically.

    The bundle is written to a staging folder next to out_dir, evaluated against the float model there (its
    manifest gains `fidelity`), and renamed into place only if it passes the --max-kld gate.
    """
    from .bundle_writer import _replace_dir, check_out_dir, write_bundle
    from .graph.llama import CONTRACT, GraphOptions, build_llama_graph
    from .reference import FloatReference

    out_dir = Path(out_dir)
    check_out_dir(out_dir, opts.overwrite)
    if opts.quant == "auto" and not (opts.reference or opts.evaluate):
        raise EdgeError("--quant auto needs the float model (drop --no-reference or --no-eval)")
    if opts.max_kld is not None and not opts.evaluate:
        raise EdgeError("--max-kld needs the held-out evaluation (drop --no-eval)")
    steps = Steps(["load", "float model", "quantize", "graph", "reference", "write", "evaluate"], opts.progress)
    staging = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}"
    try:
        steps.start("load source")
        source = load_source(spec)
        if opts.untie_embeddings:
            source = untie_embeddings(source)
        steps.done()
        if source.config.model_type not in LLAMA_FAMILY:
            steps.close()
            from .optimum_fallback import export_fallback_bundle

            return export_fallback_bundle(source, out_dir, opts)
        steps.start("float model")
        needs_float = (opts.reference or opts.evaluate or opts.quant == "auto" or smooth_of(opts)
                       or opts.method == "gptq")  # GPTQ's calibration inputs come from the float model
        ref = FloatReference(source, threads=opts.threads) if needs_float else None
        steps.done()
        steps.start(f"quantize ({opts.quant})")
        weights, quantization = quantize_step(source, opts, ref, steps.log)
        steps.done()
        steps.start("build graph")
        max_context = int(opts.max_context or source.config.max_position_embeddings)
        graphs = {kv: build_llama_graph(source.config, weights,
                                        GraphOptions(accuracy_level=opts.accuracy_level, max_context=max_context,
                                                     kv_dtype=kv))
                  for kv in kv_dtypes_of(opts)}                       # the default first
        # With int8 activations two executors agree only statistically (an ulp flips int8 roundings, which
        # compound); the same weights with float32 activations give them a graph to agree on to float rounding.
        exact = None if opts.accuracy_level == 0 or not quantization["tensors"] else build_llama_graph(
            source.config, weights, GraphOptions(accuracy_level=0, max_context=max_context, kv_dtype="float32"))
        steps.done()
        steps.start("float reference probes")
        reference = reference_probes(source, opts.threads, ref) if opts.reference else None
        steps.done()
        steps.start("write bundle")
        graph_fields = {"contract": CONTRACT, "accuracy_level": opts.accuracy_level}
        fields, extra = bundle_contents(source, graph_fields, quantization, max_context, reference, opts)
        write_bundle(staging, config=source.config, graphs=graphs, exact_graph=exact, manifest_fields=fields,
                     extra_files=extra)
        steps.done()
        steps.start("evaluate vs float")
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
