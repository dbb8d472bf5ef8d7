"""The exporter's options: one frozen-after-validation object shared by the CLI and the Python API.

`ExportOptions.validated()` checks everything that does not depend on the source (ranges, combinations) and
fills the defaults; export.quant.recipes checks, once the source is loaded, that every option given changes
something for it. Both raise OptionsError: one line, exit code 2, no traceback.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from edge_runtime.errors import EdgeError

RECIPES = ("q4", "exact", "q8", "mixed", "fp32")
DEFAULT_RECIPE = "q4"
# --quant's preset names, accepted as aliases of the recipes so that existing command lines keep working.
ALIASES = {"int4": "q4", "int8": "q8", "auto": "mixed"}
METHODS = ("search", "gptq", "rtn")
BLOCK_SIZES = (16, 32, 64, 128)
MIXED_DEFAULT_KLD = 0.02


class OptionsError(EdgeError):
    """Export options that contradict each other or do nothing for this source."""

    exit_code = 2


@dataclass
class ExportOptions:
    """What to export and how; see `edge-export -h` for each field's flag. None means "not given"."""

    recipe: str = DEFAULT_RECIPE     # q4 | exact | q8 | mixed | fp32 (or an alias: int4, int8, auto)
    quant: Optional[str] = None      # the alias option of `recipe` (int4 | int8 | auto | fp32); wins when given
    target_kld: Optional[float] = None  # mixed: the held-out KLD the per-matmul int4/int8 choice aims at
    max_kld: Optional[float] = None  # the quality gate: fail (nothing written) when a domain's KLD exceeds it
    force: bool = False              # write the bundle even when it misses max_kld
    accuracy_level: int = 4          # MatMulNBits activations: 4 = int8 (fast VNNI path), 0 = fp32
    block_size: Optional[int] = None  # re-quantized weights' blocks (default 16 for smoothed int8, else 32)
    method: Optional[str] = None     # int4 of float weights: search (default) | gptq | rtn
    offsets: bool = False            # int4 of float weights: per-block float offsets (asymmetric float minimum)
    transcode: bool = True           # GGUF Q4_0/Q4_1/Q8_0 blocks are transcoded exactly instead of re-quantized
    untie_embeddings: bool = False   # a tied lm_head stored apart from the embedding table
    vocab_block: Optional[int] = None  # q4 / mixed / exact: the int8 embedding / lm_head's block size
    smooth: Optional[bool] = None    # q8: SmoothQuant-style scales folded into the weights (default on at level 4)
    smooth_alpha: Optional[float] = None  # q8 smoothing strength in [0, 1] (default 0.5)
    act_aware: bool = True           # int4 of float weights: weight the error by calibration activations
    max_context: Optional[int] = None
    kv_dtype: Optional[str] = None   # KV cache precision; default: one graph for each
    threads: int = 2
    reference: bool = True           # store the float model's probes (reference.json)
    evaluate: bool = True            # measure fidelity on the evaluation domains (manifest `fidelity`)
    eval_text: Optional[str] = None  # evaluate on this text file instead of the domains
    sensitivity_cache: Optional[str] = None  # mixed: folder caching per-matmul sensitivities
    progress: bool = True
    overwrite: bool = False          # replace a bundle already at the output path (never anything else)
    extra_manifest: dict = field(default_factory=dict)

    def validated(self) -> "ExportOptions":
        """A copy with the recipe name resolved, after the checks that need no source (OptionsError)."""
        recipe = ALIASES.get(self.quant or self.recipe, self.quant or self.recipe)
        if recipe not in RECIPES:
            raise OptionsError(f"unknown recipe {self.quant or self.recipe!r} (choose from {', '.join(RECIPES)})")
        o = dataclasses.replace(self, recipe=recipe, quant=None)
        _check_ranges(o)
        _check_combinations(o)
        return o

    @property
    def smoothing(self) -> bool:
        """Smoothing pays only where MatMulNBits rounds activations to int8 and weights are int8."""
        if self.smooth is None:
            return self.recipe == "q8" and self.accuracy_level == 4
        return bool(self.smooth)

    @property
    def weight_block(self) -> int:
        """Block size of re-quantized weights: 16 for smoothed int8 (finer int8 activations), else 32."""
        return self.block_size or (16 if self.smoothing else 32)

    @property
    def int4_method(self) -> str:
        return self.method or "search"


def _check_ranges(o: ExportOptions) -> None:
    for name in ("target_kld", "max_kld"):
        v = getattr(o, name)
        if v is not None and not v > 0:
            raise OptionsError(f"--{name.replace('_', '-')} must be positive (got {v})")
    if o.smooth_alpha is not None and not 0.0 <= o.smooth_alpha <= 1.0:
        raise OptionsError(f"--smooth-alpha must be in [0, 1] (got {o.smooth_alpha})")
    if o.max_context is not None and o.max_context < 16:
        raise OptionsError(f"--max-context must be at least 16 (got {o.max_context})")
    if o.method is not None and o.method not in METHODS:
        raise OptionsError(f"unknown --method {o.method!r} (choose from {', '.join(METHODS)})")
    if o.block_size is not None and o.block_size not in BLOCK_SIZES:
        raise OptionsError(f"--block-size must be one of {BLOCK_SIZES} (got {o.block_size})")
    if o.accuracy_level not in (0, 1, 2, 3, 4):
        raise OptionsError(f"--accuracy-level must be 0-4 (got {o.accuracy_level})")
    if o.threads < 1:
        raise OptionsError(f"--threads must be at least 1 (got {o.threads})")


def _check_combinations(o: ExportOptions) -> None:
    """Options that contradict each other or the recipe, whatever the source."""
    if o.method == "gptq" and o.offsets:
        raise OptionsError("--method gptq rounds onto integer zero points: it cannot take --offsets")
    if o.target_kld is not None and o.recipe != "mixed":
        raise OptionsError(f"--target-kld sets the mixed recipe's goal; recipe {o.recipe} has none "
                           "(--max-kld is the quality gate)")
    if o.vocab_block is not None and o.recipe not in ("q4", "mixed", "exact"):
        raise OptionsError(f"--vocab-block sets the int8 embedding / lm_head of q4, mixed and exact, not {o.recipe}")
    if o.recipe == "exact" and o.vocab_block not in (None, 16, 32):
        raise OptionsError("recipe exact keeps GGUF blocks of 32: --vocab-block 32 keeps the embedding / lm_head's, "
                           "16 splits them")
    if (o.smooth is not None or o.smooth_alpha is not None) and o.recipe != "q8":
        raise OptionsError(f"smoothing applies to the q8 recipe only, not {o.recipe}")
    if o.recipe in ("fp32", "exact", "q8") and (o.method is not None or o.offsets):
        raise OptionsError(f"--method / --offsets choose int4 rounding; recipe {o.recipe} rounds nothing to int4")
    if o.recipe == "fp32" and o.block_size is not None:
        raise OptionsError("--block-size does nothing for recipe fp32")
    if o.recipe == "exact" and not o.transcode:
        raise OptionsError("recipe exact transcodes GGUF blocks: it cannot take --no-transcode")
    if o.recipe == "mixed" and not (o.reference or o.evaluate):
        raise OptionsError("recipe mixed needs the float model (drop --no-reference or --no-eval)")
    if o.max_kld is not None and not o.evaluate:
        raise OptionsError("--max-kld needs the evaluation (drop --no-eval)")
