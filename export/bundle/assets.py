"""What both exporters write beside the graph: the tokenizer and its manifest entry (chat template, special tokens),
the reference probes file, and the manifest keys the exporter owns."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from edge_runtime.tokenizer.tokenizer import Tokenizer

from ..sources.source import SourceModel, render_chat

if TYPE_CHECKING:
    from ..options import ExportOptions


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
        return tok.encode(render_chat(meta, text), add_bos=False)

    return encode_chat


MERGES_FILE = "tokenizer.merges.bin"


def tokenizer_manifest(source: SourceModel) -> dict:
    meta = source.tokenizer_meta
    return {"file": "tokenizer.json", "bos_token_id": meta.get("bos_token_id"),
            "eos_token_ids": list(meta.get("eos_token_ids") or []), "pad_token_id": meta.get("pad_token_id"),
            "special_tokens": dict(meta.get("special_tokens") or {}), "chat_template": meta.get("chat_template"),
            "add_bos_token": bool(meta.get("add_bos_token", False))}


def merge_ids_bytes(tokenizer_json: str) -> Optional[bytes]:
    """tokenizer.json's BPE merges as little-endian int32 (left, right, merged) id rows in rank order (the
    runtime's pure-Python BPE builds its merge table from them instead of looking up every merge's strings);
    None for a model without merges."""
    from edge_runtime.tokenizer.bpe import merge_id_rows

    model = json.loads(tokenizer_json).get("model") or {}
    if model.get("type", "BPE") != "BPE" or not model.get("merges"):
        return None
    rows = merge_id_rows(model["vocab"], model["merges"], len(model.get("continuing_subword_prefix") or ""))
    return rows.astype("<i4").tobytes()


def bundle_contents(source: SourceModel, graph_fields: dict, quantization: dict, max_context: int,
                    reference: Optional[dict], opts: ExportOptions) -> tuple[dict, dict]:
    """The manifest keys the exporter owns, and the bundle's files besides the graph and weights."""
    merges = merge_ids_bytes(source.tokenizer_json)
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
    if merges is not None:
        fields["tokenizer"]["merges_file"] = MERGES_FILE
        extra[MERGES_FILE] = merges
    if reference is not None:
        fields["reference"] = {"file": "reference.json"}
        extra["reference.json"] = json.dumps(reference)
    return fields, extra
