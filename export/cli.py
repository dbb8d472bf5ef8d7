"""`edge-export`: turn a GGUF file, a Hugging Face folder or a tiny test config into a bundle."""
from __future__ import annotations

import json
import sys

from edge_runtime.cli.errors import DEBUG_FLAG, DEBUG_HELP, ArgumentParser, run_guarded, wants_debug
from edge_runtime.errors import EdgeError

from .options import ALIASES, RECIPES


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="edge-export", description=__doc__)
    ap.add_argument("source", help="a .gguf file, a Hugging Face model folder, or tiny:llama|qwen2|mistral")
    ap.add_argument("--out", required=True,
                    help="bundle folder to write: a new path or an empty folder; a folder holding a bundle only with "
                         "--overwrite; anything else is refused and left untouched. The bundle is moved into place "
                         "only once complete")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace a bundle already at --out (in one swap, after the new one is complete)")
    ap.add_argument("--recipe", default=None, choices=RECIPES + tuple(ALIASES),
                    help="q4 (default): int4 layers, int8 embedding / lm_head; exact: GGUF blocks transcoded as they "
                         "are, float tensors int8; q8: int8; mixed: int4/int8 per matmul, fewest bytes meeting "
                         "--target-kld; fp32")
    ap.add_argument("--quant", default=None, choices=tuple(ALIASES) + ("fp32", "exact"),
                    help="alias of --recipe, for existing command lines: int4 = q4, int8 = q8, auto = mixed")
    ap.add_argument("--target-kld", type=float, metavar="X",
                    help="mixed: the KLD from float the per-matmul choice aims at (default 0.02)")
    ap.add_argument("--block-size", type=int, default=None, choices=(16, 32, 64, 128),
                    help="weight block size, also MatMulNBits' int8 activation blocks (default 16 for smoothed int8, "
                         "else 32; recipe exact: 16 splits all its 8-bit GGUF blocks, the same values, 32 none; "
                         "by default the attention projections')")
    ap.add_argument("--method", default=None, choices=("search", "gptq", "rtn"),
                    help="int4 of float weights: search (error-minimizing block scale/zero point), gptq (the same "
                         "search, codes rounded by GPTQ against calibration inputs), rtn")
    ap.add_argument("--offsets", action="store_true",
                    help="int4 of float weights with a per-block float offset (asymmetric float minimum)")
    ap.add_argument("--untie-embeddings", action="store_true",
                    help="store a tied lm_head apart from the embedding table: the lm_head quantized by the preset "
                         "(GPTQ-rounded under --method gptq), the table at 8 bits (more bytes on disk, none per token)")
    ap.add_argument("--vocab-block", type=int, default=None, choices=(16, 32, 64),
                    help="q4 / mixed / exact: block size of the int8 embedding / lm_head (default 32 / 64 / "
                         "--block-size's; smaller blocks give the lm_head finer int8 inputs: lower KLD, more "
                         "scales to read)")
    ap.add_argument("--no-transcode", action="store_true",
                    help="re-quantize GGUF blocks instead of transcoding them exactly")
    ap.add_argument("--kv-dtype", default=None, choices=("float32", "float16"),
                    help="only the graph with this KV-cache precision (default: one graph each, sharing the weights; "
                         "the runtime takes float32 unless a memory budget needs float16)")
    ap.add_argument("--accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4),
                    help="MatMulNBits activation precision: 4 = int8 (fast), 0 = fp32")
    ap.add_argument("--no-smooth", action="store_true",
                    help="int8: do not fold per-channel activation scales into the weights (SmoothQuant-style "
                         "smoothing, on by default at accuracy level 4)")
    ap.add_argument("--smooth-alpha", type=float, default=None, metavar="A",
                    help="int8 smoothing strength in [0, 1] (default 0.5)")
    ap.add_argument("--max-context", type=int, default=None, help="largest context the bundle supports")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-reference", action="store_true", help="do not store the float model's probes")
    f = ap.add_argument_group("fidelity (held-out comparison with the float model, stored in the manifest)")
    f.add_argument("--eval-text", metavar="FILE", help="held-out text (default: CPython's pydoc topics)")
    f.add_argument("--max-kld", type=float, metavar="X",
                   help="fail (nothing written) if the bundle's mean KLD from float exceeds X")
    f.add_argument("--force", action="store_true", help="write the bundle even if it misses --max-kld")
    f.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    f.add_argument("--no-act-aware", action="store_true",
                   help="int4 of float weights: plain squared error (no calibration activation weighting)")
    f.add_argument("--sensitivity-cache", metavar="DIR",
                   help="mixed: cache per-matmul sensitivities here (reused across targets)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    return ap


def options_of(args):
    """The ExportOptions of parsed arguments, validated (OptionsError: one line) before any work."""
    from edge_runtime.threads import check_threads

    from .options import ExportOptions

    if args.recipe and args.quant:
        raise EdgeError("give --recipe or its former name --quant, not both")
    return ExportOptions(recipe=args.recipe or "q4", quant=args.quant, target_kld=args.target_kld,
                         kv_dtype=args.kv_dtype, accuracy_level=args.accuracy_level, block_size=args.block_size,
                         method=args.method, offsets=args.offsets, transcode=not args.no_transcode,
                         max_context=args.max_context, threads=check_threads(args.threads, "--threads"),
                         reference=not args.no_reference, progress=not args.quiet,
                         evaluate=not args.no_eval, eval_text=args.eval_text, max_kld=args.max_kld,
                         force=args.force, act_aware=not args.no_act_aware,
                         sensitivity_cache=args.sensitivity_cache,
                         smooth=False if args.no_smooth else None, smooth_alpha=args.smooth_alpha,
                         untie_embeddings=args.untie_embeddings, vocab_block=args.vocab_block,
                         overwrite=args.overwrite).validated()


def export(argv) -> int:
    """Parse, check, export; print where the bundle went and its fidelity summary."""
    from .bundle.writer import check_out_dir
    from .pipeline import export_bundle

    args = build_parser().parse_args(argv)
    opts = options_of(args)
    check_out_dir(args.out, args.overwrite)
    out = export_bundle(args.source, args.out, opts)
    print(f"bundle written: {out}")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    from .quant.quantize import gguf_paths

    paths = gguf_paths((manifest.get("quantization") or {}).get("tensors") or {})
    if paths:
        print(paths)
    fidelity = manifest.get("fidelity")
    if fidelity and "heldout" in fidelity:
        from .quality.evaluate import summary

        print(summary(fidelity))
    return 0


def main(argv=None) -> int:
    """Entry point of `edge-export`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_guarded("edge-export", lambda: export(argv), debug=wants_debug(argv),
                       interrupted="interrupted (nothing written)")

if __name__ == "__main__":
    sys.exit(main())
