"""Quality-budgeted quantization: per-matmul int4 sensitivity, then int4/int8 per matmul to meet a KLD target.

A unit is what the graph runs as one MatMulNBits (q/k/v fused, gate/up fused, o, down, the embedding /
lm_head), so a plan never splits a fused matmul. Sensitivity of a unit = KL(float || float with only that
unit at int4) on calibration windows, measured in the float reference itself (export.quality.reference) with the
unit's weights swapped for their dequantized int4 values; decoder layers before the unit are not re-run
(their outputs are captured once). The plan starts from int8 everywhere and moves to int4 the units with the
least KLD per byte saved, until the predicted KLD (sum of the units', which holds for small independent
perturbations) reaches the budget; the joint KLD of the plan is then measured and the plan trimmed if the sum
was optimistic.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edge_runtime.format.config import ModelConfig
from edge_runtime.format.quant import BlockQuant
from edge_runtime.spec import EMBED, LM_HEAD, Unit, spec_for

from .calibration import each_matmul_input
from .quantize import QuantSpec, preset_specs, quantize_tensor

# Share of the KLD target the weights may use on calibration text: the rest is left for MatMulNBits' int8
# activations (accuracy_level 4) and for held-out text behaving differently from the calibration windows.
WEIGHT_BUDGET_SHARE = 0.6
TRIM_ROUNDS = 4
VOCAB_INT8_BLOCK = 64
CACHE_VERSION = 1


def units(config: ModelConfig) -> list[Unit]:
    """Every quantizable matmul, fused as the graph builder fuses them (DecoderSpec.units)."""
    return spec_for(config).units()


def _layer_of(unit: Unit) -> int | None:
    return int(unit.label.split(".")[1]) if unit.label.startswith("layers.") else None


# -- calibration statistics ----------------------------------------------------------------------------------


def activation_scales(torch_model, windows: Sequence[Sequence[int]], tied: bool) -> dict[str, np.ndarray]:
    """HF weight name -> RMS over calibration tokens of each input channel of its matmul, float32 [K]."""
    import torch

    names = {m: EMBED if (tied and m == "lm_head") else f"{m}.weight"
             for m, mod in torch_model.named_modules() if isinstance(mod, torch.nn.Linear)}
    sums: dict = {}
    counts: dict[str, int] = {}

    def add(name, x):  # x [tokens, K]
        sums[name] = sums.get(name, 0) + (x * x).sum(0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    each_matmul_input(torch_model, windows, names, add)
    return {n: np.sqrt(sums[n].numpy() / counts[n]).astype(np.float32) for n in sums}


# -- KL of a perturbed float model ---------------------------------------------------------------------------


class PerturbedKL:
    """KL(float || float with some weights replaced) on calibration windows, re-running only what changed."""

    def __init__(self, torch_model, windows: Sequence[Sequence[int]]):
        import torch

        self.model, self.windows = torch_model, [list(w) for w in windows]
        self.layers = torch_model.model.layers
        self.params = dict(torch_model.named_parameters())
        self.inputs, self.float_logp = [], []
        captured: list = []
        hooks = [layer.register_forward_pre_hook(
            lambda _m, args, kwargs: captured.append((args[0].detach().clone(), kwargs)), with_kwargs=True)
            for layer in self.layers]
        try:
            with torch.no_grad():
                for ids in self.windows:
                    captured.clear()
                    out = torch_model(input_ids=torch.as_tensor([ids]), use_cache=False)
                    self.inputs.append(list(captured))                    # per layer: (hidden [1,S,H], kwargs)
                    self.float_logp.append(torch.log_softmax(out.logits[0].double(), -1))  # [S, V]
        finally:
            for h in hooks:
                h.remove()

    def _param(self, hf_name: str):
        if hf_name in self.params:
            return self.params[hf_name]
        return self.params[LM_HEAD]  # tied: lm_head shares the embedding's parameter

    def kl(self, replace: Mapping[str, np.ndarray], first_layer: int | None = None) -> float:
        """Mean KL over calibration positions with `replace` (HF name -> float32 [N, K]) swapped in.

        first_layer: the earliest decoder layer the replacement touches (None: run the whole model).
        """
        import torch

        saved = {}
        try:
            for name, w in replace.items():
                p = self._param(name)
                saved[name] = p.data
                p.data = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
            total, n = 0.0, 0
            with torch.no_grad():
                for ids, inputs, lp in zip(self.windows, self.inputs, self.float_logp):
                    logits = self._logits(ids, inputs, first_layer)
                    lq = torch.log_softmax(logits.double(), -1)
                    total += float((lp.exp() * (lp - lq)).sum(-1).sum())
                    n += lp.shape[0]
            return total / n
        finally:
            for name, data in saved.items():
                self._param(name).data = data

    def _logits(self, ids, inputs, first_layer: int | None):
        import torch

        if first_layer is None:
            return self.model(input_ids=torch.as_tensor([ids]), use_cache=False).logits[0]
        h = inputs[first_layer][0]
        for layer, (_, kwargs) in zip(self.layers[first_layer:], inputs[first_layer:]):
            h = layer(h, **kwargs)
            h = h[0] if isinstance(h, tuple) else h
        return self.model.lm_head(self.model.model.norm(h))[0]


# -- the plan ------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Bits per unit, and the evidence behind them (manifest `quantization.auto`)."""

    bits: dict                 # unit label -> 4 | 8
    sensitivity: dict          # unit label -> KLD with only that unit at int4
    predicted_kl: float        # sum of the int4 units' sensitivities
    measured_kl: float | None  # joint KLD of the plan on calibration (all units at their bits)
    budget: float              # the calibration KLD the plan aimed for

    def to_dict(self) -> dict:
        return {"bits": self.bits, "sensitivity": {k: float(v) for k, v in self.sensitivity.items()},
                "predicted_kl": float(self.predicted_kl), "budget": float(self.budget),
                "measured_kl": None if self.measured_kl is None else float(self.measured_kl)}


def choose_bits(sens: Mapping[str, float], saved: Mapping[str, int], budget: float) -> dict:
    """Greedy knapsack: int4 for the units with the least KLD per byte saved while the sum stays in budget."""
    order = sorted(sens, key=lambda u: max(sens[u], 0.0) / max(saved[u], 1))
    bits, spent = {u: 8 for u in sens}, 0.0
    for u in order:
        cost = max(sens[u], 0.0)
        if spent + cost <= budget:
            bits[u], spent = 4, spent + cost
    return bits


class Candidates:
    """The int4 and int8 quantization of every unit's weights (computed once, reused by the export)."""

    def __init__(self, source, specs4: Mapping, specs8: Mapping, act_scales: Mapping[str, np.ndarray],
                 hessians: Mapping[str, np.ndarray] | None = None):
        self.source, self.specs = source, {4: specs4, 8: specs8}
        self.act_scales, self.hessians = act_scales, hessians or {}
        self.cache: dict = {}

    def quant(self, name: str, bits: int) -> BlockQuant:
        key = (name, bits)
        if key not in self.cache:
            spec = self.specs[bits][name]
            act = self.act_scales.get(name) if spec.method == "search" else None
            self.cache[key] = quantize_tensor(name, self.source.tensors[name], spec, self.source.gguf_blocks,
                                              act_scale=act, hessian=self.hessians.get(name))
        return self.cache[key]

    def exact_or_single(self, unit: Unit) -> bool:
        """True when the unit's int4 candidate transcodes its GGUF blocks, or equals its int8 candidate."""
        return all(self.specs[4][n].method == "transcode" or self.specs[4][n] == self.specs[8][n]
                   for n in unit.names)

    def nbytes(self, unit: Unit, bits: int) -> int:
        return sum(self.quant(n, bits).nbytes for n in unit.names)

    def dequantized(self, unit: Unit, bits: int) -> dict[str, np.ndarray]:
        return {n: self.quant(n, bits).dequantize() for n in unit.names}


def measure_sensitivity(kl: PerturbedKL, cands: Candidates, all_units: Sequence[Unit],
                        log: Callable[[str], None] = lambda s: None) -> dict[str, float]:
    """unit label -> KLD with only that unit at int4 (everything else float).

    Not measured (0) where there is nothing to learn: a unit whose int4 candidate is the exact transcode of the
    GGUF blocks the float weights were read from, or whose int4 and int8 candidates are the same."""
    sens = {}
    for j, u in enumerate(all_units):
        if cands.exact_or_single(u):
            sens[u.label] = 0.0
            log(f"sensitivity {j + 1}/{len(all_units)} {u.label}: exact, not measured")
            continue
        sens[u.label] = kl.kl(cands.dequantized(u, 4), _layer_of(u))
        log(f"sensitivity {j + 1}/{len(all_units)} {u.label}: {sens[u.label]:.5f}")
    return sens


def plan_bits(kl: PerturbedKL, cands: Candidates, all_units: Sequence[Unit], sens: Mapping[str, float],
              target: float, log: Callable[[str], None] = lambda s: None) -> Plan:
    """Choose bits per unit for a calibration KLD of target * WEIGHT_BUDGET_SHARE; measure and trim."""
    saved = {u.label: cands.nbytes(u, 8) - cands.nbytes(u, 4) for u in all_units}
    goal = target * WEIGHT_BUDGET_SHARE
    budget = goal
    for _ in range(TRIM_ROUNDS):
        bits = choose_bits(sens, saved, budget)
        replace = {}
        for u in all_units:
            replace.update(cands.dequantized(u, bits[u.label]))
        measured = kl.kl(replace, None)
        predicted = sum(max(sens[u], 0.0) for u, b in bits.items() if b == 4)
        log(f"plan: {sum(b == 4 for b in bits.values())}/{len(bits)} units int4, predicted KLD {predicted:.4f}, "
            f"measured {measured:.4f} (goal {goal:.4f})")
        if measured <= goal or predicted == 0.0:
            return Plan(bits, dict(sens), predicted, measured, goal)
        budget *= 0.8 * goal / measured  # the sum was optimistic by measured/predicted: shrink and retry
    bits = {u: 8 for u in sens}
    return Plan(bits, dict(sens), 0.0, None, goal)


# -- entry point used by the export pipeline -----------------------------------------------------------------


def vocab_int8_specs(cfg: ModelConfig, block: int = VOCAB_INT8_BLOCK) -> dict:
    """The int8 candidate of the vocabulary matrices (embedding / lm_head): blocks of `block`.

    The lm_head is the largest matmul of a small model and often the one the mixed recipe keeps at int8: with
    blocks of 64 MLAS's int8 kernel reads half the scales of blocks of 32 and runs it faster, for a slightly
    higher calibration KLD than the exact Q8_0 copy. Smaller blocks go the other way: MatMulNBits rounds its
    int8 activations per weight block, so blocks of 16 give the lm_head finer inputs: lower KLD, slower decode
    (bench/fidelity.py: presets auto and auto-vocab16).
    """
    out = {}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if cfg.hidden_size % block == 0 and not (name == "lm_head.weight" and cfg.tie_word_embeddings):
            out[name] = QuantSpec(8, block, "sym")
    return out


def cache_key(source, specs4: Mapping, act_aware: bool, windows: Sequence[Sequence[int]]) -> str:
    kinds = sorted({repr(s) for s in specs4.values() if s is not None})  # the int4 candidates' QuantSpecs
    h = hashlib.sha256(json.dumps([CACHE_VERSION, source.origin.get("sha256"), kinds, act_aware,
                                   [[int(t) for t in w] for w in windows]]).encode())
    return h.hexdigest()[:16]


def auto_quantize(source, torch_model, windows: Sequence[Sequence[int]], target: float, *, transcode: bool = True,
                  method: str = "search", offsets: bool = False, block_size: int = 32, act_aware: bool = True,
                  cache_dir: Path | None = None, hessians: Mapping[str, np.ndarray] | None = None,
                  vocab_block: int | None = None,
                  log: Callable[[str], None] = lambda s: None) -> tuple[dict, dict, Plan]:
    """Mixed int4/int8 weights for `source` meeting `target` KLD: (HF name -> BlockQuant, specs, Plan).

    torch_model: the float reference (export.quality.reference.FloatReference.torch_model); windows: calibration
    token windows (disjoint from the held-out evaluation text). The per-unit sensitivities are cached in
    cache_dir (keyed by source, method and calibration) so that trying several targets measures them once.
    method="gptq" rounds the int4 candidates by GPTQ under `hessians` (HF name -> [K, K]; preset_specs keeps
    the search for what GPTQ cannot round). vocab_block: the vocabulary int8 candidate's blocks (default
    VOCAB_INT8_BLOCK).
    """
    cfg = source.config
    all_units = units(cfg)
    specs4 = preset_specs(cfg, "int4", source.gguf_blocks, transcode=transcode, method=method, offsets=offsets,
                          block_size=block_size)
    specs8 = preset_specs(cfg, "int8", source.gguf_blocks, transcode=transcode, block_size=block_size)
    specs8.update(vocab_int8_specs(cfg, vocab_block or VOCAB_INT8_BLOCK))
    act = activation_scales(torch_model, windows, cfg.tie_word_embeddings) if act_aware else {}
    cands = Candidates(source, specs4, specs8, act, hessians)
    kl = PerturbedKL(torch_model, windows)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"sensitivity-{cache_key(source, specs4, act_aware, windows)}.json"
    if path is not None and path.is_file():
        sens = json.loads(path.read_text())
        log(f"sensitivity: cached {path}")
    else:
        sens = measure_sensitivity(kl, cands, all_units, log)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(sens, indent=1))
    plan = plan_bits(kl, cands, all_units, sens, target, log)
    weights, specs = {}, {}
    for u in all_units:
        b = plan.bits[u.label]
        for n in u.names:
            weights[n], specs[n] = cands.quant(n, b), (specs4 if b == 4 else specs8)[n]
    return weights, specs, plan

