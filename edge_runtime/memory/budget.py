"""The memory planner: the peak resident memory of a generation session, from a bundle's manifest alone.

The peak is the largest of three moments:

    parse: runtime + the tokenizer.json being parsed              (read first, while little else is resident)
    load:  runtime + tokenizer + weights + load transient         (ONNX Runtime prepacking the weights: the file's
                                                                   pages it has read are paged out as it goes,
                                                                   memory.pages.paging_out, so what remains is
                                                                   the pager's lag; without it, + mapped + the
                                                                   largest weight held twice)
    run:   runtime + tokenizer + weights + KV cache + mapped + activations + logits

* runtime      the interpreter with NumPy, edge_runtime and the backend's library imported (measured);
* tokenizer    the parsed tokenizer.json: a measured ratio to the file's size per implementation (the
               compact pure-Python BPE by default);
* weights      what the backend keeps resident: ONNX Runtime's prepacked MatMulNBits copies (codes, scales and
               block sums), the memory-mapped tensors it reads in place; NumPy's mmapped weights.bin plus any
               dequantized float32 matrices it keeps (`resident_bytes`);
* KV cache     kv_heads x head_dim x dtype x 2 x the positions each layer keeps (the context, or its window
               for a sliding-window layer kept as a ring: manifest `decoder.layers`): reserved when the backend
               is built and resident as positions fill, so the plan is the ceiling a full context reaches;
* activations  a prefill chunk's hidden states, MLP and attention scores [heads, chunk, context] (+ the
               allocator's slack, measured);
* logits       the float32 vocabulary rows a step returns.

Sizes that cannot be derived from the manifest are measured constants kept in CALIBRATION (one entry per
backend); `bench/memory.py` prints plan against measurement to re-derive them.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from ..errors import EdgeError, MemoryBudgetError
from ..format.bundle import check_context, kv_dtypes
from ..format.config import ModelConfig
from ..format.contracts import WINDOW_INPUTS
from ..generation.stats import MB, format_size
from ..spec import kv_capacity, spec_for, supported
from ..tokenizer.tokenizer import resolve_impl
from .pages import FAULT_AROUND, RELEASE_STEPS, can_page_out

# Tried largest first: a larger chunk prefills faster. 256 is left out: its prefill gain is small next to its
# higher peak; 128 sits between (bench/memory.py, bench/run_one.py --prefill-chunk N). 16 is for the tightest
# budgets: the attention scratch [heads, chunk, context] shrinks with the chunk, most at long contexts.
PREFILL_CHUNKS = (128, 64, 32, 16)
KV_DTYPE_BYTES = {"float32": 4, "float16": 2}
MIN_CONTEXT = 16
EMBED = "model.embed_tokens.weight"
ROTARY = "rotary."  # the graph's cos/sin tables, one pair per KV dtype (the NumPy backend computes its own)


@dataclass(frozen=True)
class Attention:
    """How a backend's attention over a KV cache of one dtype allocates its scores (measured)."""

    slack: float                 # measured / arithmetic size of the scores [heads, chunk, keys] in float32
    window: int | None           # keys scored at once (None: all of them)
    base: int = 0                # fixed buffers of that attention path (e.g. float16 <-> float32 copies)


@dataclass(frozen=True)
class Calibration:
    """Measured constants of one backend (bytes unless said otherwise); bench/memory.py re-measures them."""

    runtime: int                 # RSS after importing Python, NumPy, edge_runtime, the backend library, tokenizers
    runtime_no_tokenizers: int   # the same when the tokenizers package is not imported (the default)
    session: int                 # the backend's fixed state once built (ORT: graph, kernels, prepack padding)
    prefill_base: int            # what the first prefill allocates whatever its size (ORT: arena, kernel buffers)
    activation_slack: float      # measured / arithmetic size of a chunk's hidden states and MLP intermediates
    attention: dict              # KV dtype -> Attention
    workspace: int               # per-thread scratch of prefill (BLAS buffers, dequantized row chunks)


# The one place for measured constants, fitted by bench/memory.py from fresh-process measurements (full-context
# sessions at 512, 2048 and 8192, prefill chunk 128) of SmolLM2-135M bundles on x86-64, Python 3.11,
# onnxruntime 1.32, NumPy 2.4.6. The runtime rows are mostly the pages of the imported libraries (NumPy's
# OpenBLAS, onnxruntime), so they move with those versions: re-fit them with bench/memory.py after an upgrade.
# ORT's float32 GroupQueryAttention scores keys in windows (flat past 2048); its float16 path scores all keys at
# once and keeps float32 copies.
CALIBRATION = {
    "ort": Calibration(runtime=55 * MB, runtime_no_tokenizers=52 * MB, session=19 * MB, prefill_base=0,
                       activation_slack=0.5,
                       attention={"float32": Attention(1.15, 2048), "float16": Attention(1.5, None, 7 * MB)},
                       workspace=0),
    # NumPy's attention computes the scores in place in float64 (twice a float32 score's bytes) and reads the
    # cache in blocks of 512 positions (llama_numpy.attention); the rest of the slack is the causal mask and
    # the softmax's row temporaries
    "numpy": Calibration(runtime=37 * MB, runtime_no_tokenizers=34 * MB, session=1 * MB, prefill_base=8 * MB,
                         activation_slack=1.0,
                         attention={"float32": Attention(3.6, None), "float16": Attention(3.8, None)},
                         workspace=2 * MB),
}
# Resident bytes of a parsed tokenizer per byte of tokenizer.json: the `tokenizers` wheel fitted on SmolLM2's BPE,
# the pure-Python one on Gemma 3's 262k-piece vocabulary, which costs the most per byte of the two models.
TOKENIZER_RATIO = {"tokenizers": 23.5, "python": 2.0}
# Peak bytes while parsing, per byte of tokenizer.json (the pure-Python one parses the whole JSON tree first).
TOKENIZER_PARSE_RATIO = {"tokenizers": 23.5, "python": 11.5}
# ONNX Runtime's load transient while paging_out runs: file pages read since the pager's last pass (measured
# 13-24 MB on SmolLM2 and Gemma 3 bundles), at most the largest weight held twice.
PAGEOUT_LAG = 32 * MB
TOKENIZER_BASE = 3 * MB  # the tokenizer module, its special-token tables and its word cache


@dataclass(frozen=True)
class Component:
    name: str
    nbytes: int
    note: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    """The planned peak of one session; `total` is what must fit the budget."""

    backend: str
    context: int
    kv_dtype: str
    prefill_chunk: int
    components: tuple[Component, ...]   # the run phase, summed
    load_transient: int = 0             # extra bytes held only while the backend is being built
    parse_bytes: int = 0                # bytes held while tokenizer.json is parsed (before the backend is built)
    mapped_at_load: bool = True         # False: the weight file's pages are paged out while the backend loads
    budget: int | None = None
    resident_bytes: int = 0             # NumPy backend: dequantized matrices kept as float32
    notes: tuple[str, ...] = field(default=())

    def __getitem__(self, name: str) -> int:
        return next(c.nbytes for c in self.components if c.name == name)

    @property
    def run_peak(self) -> int:
        return sum(c.nbytes for c in self.components)

    @property
    def load_peak(self) -> int:
        held = ("runtime", "tokenizer", "weights") + (("mapped",) if self.mapped_at_load else ())
        fixed = sum(c.nbytes for c in self.components if c.name in held)
        return fixed + self.load_transient

    @property
    def parse_peak(self) -> int:
        return sum(c.nbytes for c in self.components if c.name == "runtime") + self.parse_bytes

    @property
    def total(self) -> int:
        return max(self.run_peak, self.load_peak, self.parse_peak)

    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget

    def summary(self) -> str:
        """One line: every component's size, the planned peak and the plan's settings, as
        'runtime SIZE + tokenizer SIZE + ... = PEAK (context C, kv DTYPE, prefill chunk N, BACKEND)'."""
        parts = " + ".join(f"{c.name} {format_size(c.nbytes)}" for c in self.components)
        load = f"; load peak {format_size(self.load_peak)}" if self.load_peak > self.run_peak else ""
        return (f"{parts} = {format_size(self.total)} (context {self.context}, kv {self.kv_dtype}, "
                f"prefill chunk {self.prefill_chunk}, {self.backend}{load})")

    def table(self) -> str:
        rows = [f"  {c.name:<12}{c.nbytes / MB:8.1f} MB  {c.note}".rstrip() for c in self.components]
        if self.load_transient:
            rows.append(f"  {'(load peak)':<12}{self.load_peak / MB:8.1f} MB  "
                        f"weights being prepacked: +{self.load_transient / MB:.1f} MB while loading")
        if self.parse_peak > max(self.load_peak, self.run_peak):
            rows.append(f"  {'(parse peak)':<12}{self.parse_peak / MB:8.1f} MB  tokenizer.json being parsed")
        rows.append(f"  {'peak':<12}{self.total / MB:8.1f} MB"
                    + (f"  budget {format_size(self.budget)}" if self.budget is not None else ""))
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"backend": self.backend, "context": self.context, "kv_dtype": self.kv_dtype,
                "prefill_chunk": self.prefill_chunk, "total": self.total, "budget": self.budget,
                "load_transient": self.load_transient, "resident_bytes": self.resident_bytes,
                "components": {c.name: c.nbytes for c in self.components}}


# -- what the manifest says ----------------------------------------------------------------------------------

def _manifest(bundle) -> dict:
    return bundle if isinstance(bundle, dict) else bundle.manifest


def _tensors(manifest: dict) -> dict[str, dict]:
    return manifest["weights"]["tensors"]


def _file_bytes(manifest: dict, key: str, default_name: str) -> int:
    name = (manifest.get(key) or {}).get("file", default_name)
    return int(((manifest.get("files") or {}).get(name) or {}).get("bytes", 0))


def _quantized(manifest: dict) -> dict[str, dict]:
    return (manifest.get("quantization") or {}).get("tensors") or {}


def _qbytes(tensors: dict, name: str, suffix: str) -> int:
    meta = tensors.get(f"{name}.{suffix}")
    return int(meta["nbytes"]) if meta else 0


def import_runtime_libraries(backend: str) -> None:
    """Import what a session of `backend` imports (for measurements that split libraries from the rest)."""
    importlib.import_module("numpy")
    if backend.startswith("ort"):
        importlib.import_module("onnxruntime")
    if resolve_impl("auto") == "tokenizers":  # the one Tokenizer.from_bundle will use
        importlib.import_module("tokenizers")


# -- components ------------------------------------------------------------------------------------------------

def kv_cache_bytes(cfg: ModelConfig, context: int, kv_dtype: str, windows=None) -> int:
    """kv_heads x head_dim x dtype x 2 (keys and values) x the positions of every layer: the context, or a
    sliding-window layer's spec.kv_capacity(window, context) when `windows` (per layer, None: full) is given
    (the NumPy backend's ring, ONNX Runtime's shifting buffer)."""
    windows = windows if windows is not None else (None,) * cfg.num_hidden_layers
    positions = sum(kv_capacity(w, context) for w in windows)
    return positions * cfg.num_key_value_heads * cfg.head_dim * KV_DTYPE_BYTES[kv_dtype] * 2


def kv_windows(manifest: dict, family: str) -> tuple | None:
    """The layer windows a backend family keeps window-sized, None when it keeps the whole context everywhere:
    the NumPy backend always; ONNX Runtime when the graph takes the window buffers' inputs."""
    if family == "numpy" or WINDOW_INPUTS[0] in (manifest.get("graph") or {}).get("inputs", ()):
        return layer_windows(manifest)
    return None


def window_rotary_bytes(cfg: ModelConfig, context: int, kv_dtype: str, windows) -> int:
    """ONNX Runtime's rotary rows of the shifting window buffers: cos and sin [capacity, head_dim/2]."""
    sizes = [kv_capacity(w, context) for w in windows or () if w is not None]
    return 2 * max(sizes, default=0) * (cfg.head_dim // 2) * KV_DTYPE_BYTES[kv_dtype]


def layer_windows(manifest: dict) -> tuple:
    """The window of every layer (None: full attention), as the manifest's decoder entry lists them."""
    return tuple(layer.get("window") for layer in (manifest.get("decoder") or {}).get("layers", ()))


def ort_weight_bytes(manifest: dict, kv_dtype: str = "float32", context: int | None = None,
                     prefill_chunk: int | None = None) -> tuple[int, int, int]:
    """(prepacked bytes, bytes read in place, prepack transient) of the weights under ONNX Runtime's CPU EP.

    MatMulNBits prepacks each weight for its int8-activation kernel into codes + float scales + float block
    sums (as large as the scales) at load and frees the original; the largest weight's codes and scales are
    held twice while it is packed. Float tensors (norms, the Q4_1 offsets' Gemm) are resident from load; of a
    rotary table (read in place) only the rows of the `context` positions a session can reach. The quantized
    embedding that GatherBlockQuantized reads in place from the memory-mapped weights.bin: the backend lets its
    pages go after every chunk of `prefill_chunk` tokens and every pages.RELEASE_STEPS decode steps, so at most
    the fault-around windows of that many gathered rows are resident (one window per array of the table), never
    more than the table. context / prefill_chunk None: the whole tables.
    """
    tensors, quant = _tensors(manifest), _quantized(manifest)
    tied = bool((manifest.get("config") or {}).get("tie_word_embeddings"))
    packed, in_place, transient, arrays = 0, 0, 0, 0
    for name, meta in tensors.items():
        if name.startswith(ROTARY):
            if meta["dtype"] == kv_dtype:  # not the rotary tables of the bundle's other KV-dtype graph
                packed += _rows_reached(meta, context)
        elif name.rpartition(".")[0] not in quant:
            packed += int(meta["nbytes"])  # float tensor
    for name in quant:
        codes, scales = _qbytes(tensors, name, "qweight"), _qbytes(tensors, name, "scales")
        offsets = _qbytes(tensors, name, "offsets")
        if name == EMBED:
            table = [codes, scales, _qbytes(tensors, name, "zero_points"), offsets]
            in_place, arrays = sum(table), sum(b > 0 for b in table)
            if not tied:
                continue  # gathered only, never multiplied
        else:
            packed += offsets
        packed += codes + 2 * scales
        transient = max(transient, codes + scales)
    if prefill_chunk is not None:
        in_place = min(in_place, (prefill_chunk + RELEASE_STEPS) * arrays * FAULT_AROUND)
    return packed, in_place, transient


def _rows_reached(meta: dict, context: int | None) -> int:
    """Bytes of a [positions, ...] table a session of `context` positions reads (and the fault-around window
    past its last row), at most the table."""
    nbytes = int(meta["nbytes"])
    if context is None:
        return nbytes
    rows = int(meta["shape"][0])
    return min(nbytes, -(-nbytes * min(context, rows) // rows) + FAULT_AROUND)


def numpy_weight_bytes(manifest: dict, resident_bytes: int) -> tuple[int, int]:
    """(RAM besides the file: dequantized float32 copies made at load, plus the float32 -zp*scale table
    [N, blocks] of every quantized matrix that stores zero points and, at accuracy level 4, a copy of its
    per-block offsets; the mmapped weights.bin, read whole from the first step)."""
    tensors = _tensors(manifest)
    mapped = sum(int(m["nbytes"]) for name, m in tensors.items() if not name.startswith(ROTARY))
    tables = sum(_qbytes(tensors, name, "scales") for name in _quantized(manifest)
                 if f"{name}.zero_points" in tensors)  # float32 like the scales, same shape
    if (manifest.get("graph") or {}).get("accuracy_level") == 4:
        # with int8 activations the per-block offsets are copied transposed, contiguous per row chunk
        tables += sum(_qbytes(tensors, name, "offsets") for name in _quantized(manifest))
    return int(resident_bytes) + tables, mapped


def numpy_rope_bytes(cfg: ModelConfig, context: int, kv_dtype: str) -> int:
    """The NumPy backend's rotary tables: cos and sin [context, head_dim] per distinct rope, in the KV dtype."""
    if not supported(cfg.model_type):
        return 0
    ropes = len(spec_for(cfg).ropes)
    return ropes * 2 * int(context) * cfg.head_dim * KV_DTYPE_BYTES[kv_dtype]


def activation_bytes(cfg: ModelConfig, chunk: int, context: int, cal: Calibration, kv_dtype: str) -> int:
    """The peak of a prefill chunk at the end of a full context, over what is resident before it."""
    s = min(chunk, context)
    per_token = (3 * cfg.hidden_size                          # residual, normed input, attention output
                 + cfg.q_dim + 2 * cfg.kv_dim                 # packed q/k/v
                 + 3 * cfg.intermediate_size)                 # gate/up and their product
    att = cal.attention[kv_dtype]
    keys = min(context, att.window or context)
    scores = cfg.num_attention_heads * s * keys               # [heads, chunk, keys]: a chunk at the end
    return int(cal.prefill_base + att.base + 4 * s * per_token * cal.activation_slack + 4 * scores * att.slack)


def logits_bytes(cfg: ModelConfig) -> int:
    return 2 * 4 * cfg.vocab_size  # the step's output buffer and the copy handed to the sampler


# -- the plan ----------------------------------------------------------------------------------------------------

def plan_session(bundle, context: int, backend: str = "ort", kv_dtype: str | None = None,
                 prefill_chunk: int = PREFILL_CHUNKS[0], resident_bytes: int = 0, threads: int = 2,
                 budget: int | None = None) -> MemoryPlan:
    """The planned peak of a session of `context` tokens; pure arithmetic on the manifest."""
    manifest = _manifest(bundle)
    cfg = ModelConfig.from_dict(manifest["config"])
    family = "ort" if backend.startswith("ort") else "numpy"
    cal = CALIBRATION[family]
    kv_dtype = kv_dtype or kv_dtypes(manifest)[0]
    if kv_dtype not in KV_DTYPE_BYTES:
        raise EdgeError(f"kv_dtype must be one of {', '.join(KV_DTYPE_BYTES)}, got {kv_dtype!r}")
    impl = resolve_impl("auto")  # the tokenizer implementation Tokenizer.from_bundle will use
    runtime = cal.runtime if impl == "tokenizers" else cal.runtime_no_tokenizers
    tok_file = _file_bytes(manifest, "tokenizer", "tokenizer.json")
    tok = TOKENIZER_BASE + int(TOKENIZER_RATIO[impl] * tok_file)
    parse = TOKENIZER_BASE + int(TOKENIZER_PARSE_RATIO[impl] * tok_file)
    paged_out = family == "ort" and can_page_out()
    if family == "ort":
        weights, mapped, transient = ort_weight_bytes(manifest, kv_dtype, context, prefill_chunk)
        if paged_out:
            transient = min(transient, PAGEOUT_LAG)
        wnote = "MatMulNBits prepacked at load"
    else:
        (weights, mapped), transient = numpy_weight_bytes(manifest, resident_bytes), 0
        weights += numpy_rope_bytes(cfg, context, kv_dtype)
        wnote = (f"rotary tables + zero-point tables + float32 resident copies ({resident_bytes / MB:.0f} MB "
                 "asked)")
    act = activation_bytes(cfg, prefill_chunk, context, cal, kv_dtype) + cal.workspace * threads
    windows = kv_windows(manifest, family)
    rings = sum(w is not None for w in windows or ())
    kind = "rings" if family == "numpy" else "shifting buffers"
    kv_note = f"{kv_dtype}, {context} positions" + (f", {rings} window layers as {kind}" if rings else "")
    kv = kv_cache_bytes(cfg, context, kv_dtype, windows)
    if family == "ort":
        kv += window_rotary_bytes(cfg, context, kv_dtype, windows)
    components = (
        Component("runtime", runtime, f"Python, NumPy, edge_runtime, {'onnxruntime, ' if family == 'ort' else ''}"
                                      f"{'tokenizers' if impl == 'tokenizers' else 'no tokenizers'}"),
        Component("tokenizer", tok, f"{impl} implementation"),
        Component("weights", weights + cal.session, wnote + " + backend state"),
        Component("kv_cache", kv, kv_note),
        Component("mapped", mapped, "weights.bin pages read in place: the embedding rows gathered since the "
                                    "backend last let them go" if family == "ort" else
                                    "weights.bin pages read in place (all of them)"),
        Component("activations", act, f"prefill chunk {min(prefill_chunk, context)} at the end of the context"),
        Component("logits", logits_bytes(cfg), f"vocab {cfg.vocab_size}"),
    )
    return MemoryPlan(backend, int(context), kv_dtype, int(prefill_chunk), components, transient, parse,
                      not paged_out, budget, int(resident_bytes))


def kv_dtype_choices(bundle, backend: str) -> tuple[str, ...]:
    """KV dtypes a backend can run, most precise first (an ONNX graph fixes its own)."""
    if backend.startswith("ort"):  # one graph per KV dtype the bundle holds, the more precise first
        have = kv_dtypes(_manifest(bundle))
        return tuple(d for d in KV_DTYPE_BYTES if d in have)
    return tuple(KV_DTYPE_BYTES)


def largest_context(bundle, budget: int, backend: str = "ort", kv_dtype: str | None = None,
                    prefill_chunk: int = PREFILL_CHUNKS[-1], **kw) -> int:
    """The largest context (<= the bundle's max_context) whose plan fits `budget`; 0 if none does."""
    hi = int(_manifest(bundle)["max_context"])

    def fits(context: int) -> bool:
        return plan_session(bundle, context, backend, kv_dtype, prefill_chunk, **kw).total <= budget

    if not fits(1):
        return 0
    lo = 1
    while lo < hi:  # the plan grows with the context: bisect for the last one that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def plan(bundle, budget: int, context: int | None = None, backend: str = "ort", kv_dtype: str | None = None,
         prefill_chunk: int | None = None, resident_bytes: int = 0, threads: int = 2) -> MemoryPlan:
    """Choose context (when None: the largest that fits), KV dtype and prefill chunk so that the session's
    planned peak fits `budget` bytes; raise MemoryBudgetError with the breakdown when nothing does."""
    budget = int(budget)
    manifest = _manifest(bundle)
    max_ctx = int(manifest["max_context"])
    if context is not None:
        check_context(context, max_ctx)
    dtypes = (kv_dtype,) if kv_dtype else kv_dtype_choices(bundle, backend)
    chunks = (prefill_chunk,) if prefill_chunk else PREFILL_CHUNKS
    kw = {"backend": backend, "resident_bytes": resident_bytes, "threads": threads}
    best = {d: largest_context(bundle, budget, kv_dtype=d, prefill_chunk=chunks[-1], **kw) for d in dtypes}
    if context is None:
        reach = max(best.values())
        if reach >= MIN_CONTEXT:
            dtype = next(d for d in dtypes if best[d] == reach)  # ties go to the more precise dtype
            return _with_largest_chunk(bundle, budget, reach, dtype, chunks, kw)
        context = MIN_CONTEXT
    for dtype in dtypes:
        if best[dtype] >= context:
            return _with_largest_chunk(bundle, budget, int(context), dtype, chunks, kw)
    raise _over_budget(bundle, budget, int(context), dtypes[-1], chunks[-1], best, kw)


def _with_largest_chunk(bundle, budget, context, dtype, chunks, kw) -> MemoryPlan:
    for chunk in chunks:
        p = plan_session(bundle, context, kv_dtype=dtype, prefill_chunk=chunk, budget=budget, **kw)
        if p.fits():
            return p
    raise AssertionError("largest_context promised a fit")  # unreachable: chunks[-1] was checked


def _over_budget(bundle, budget, context, dtype, chunk, best, kw) -> MemoryBudgetError:
    p = plan_session(bundle, context, kv_dtype=dtype, prefill_chunk=chunk, budget=budget, **kw)
    reach = max(best.values())
    if reach >= MIN_CONTEXT:
        d = next(d for d in best if best[d] == reach)
        hint = f"the largest context that fits is {reach} (kv {d})"
    else:
        least = plan_session(bundle, MIN_CONTEXT, kv_dtype=dtype, prefill_chunk=chunk, **kw)
        hint = f"no context fits: even context {MIN_CONTEXT} needs {format_size(least.total)}"
    return MemoryBudgetError(f"memory plan {format_size(p.total)} exceeds the budget of {format_size(budget)} at "
                             f"context {context}: {p.summary()}; {hint}", plan=p,
                             max_context=reach if reach >= MIN_CONTEXT else None)


def resolve_backend(bundle, backend: str = "auto", budget: int | None = None, context: int | None = None,
                    kv_dtype: str | None = None) -> str:
    """The backend load() builds for `bundle`: "auto" is ONNX Runtime when installed, else NumPy; under a
    budget that ONNX Runtime's plan cannot meet, "auto" is the NumPy backend if its plan does (it keeps no
    prepacked copies, so it can fit where ONNX Runtime does not; bench/memory.py --backend numpy measures it).
    When neither fits, the first backend's MemoryBudgetError is raised."""
    from .. import backends

    name = backends.resolve(backend, bundle.contract)
    if backend != "auto" or budget is None or name == "numpy":
        return name
    try:
        plan(bundle, budget, context=context, backend=name, kv_dtype=kv_dtype)
        return name
    except MemoryBudgetError as first:
        try:
            backends.resolve("numpy", bundle.contract)
            plan(bundle, budget, context=context, backend="numpy", kv_dtype=kv_dtype)
        except EdgeError:
            raise first from None
        return "numpy"
