"""Conversations that keep their KV cache between turns: the Session (session), its saved form bound to one bundle and
KV dtype (session_file), and who may use a Model's one KV cache at a time (state). May import
edge_runtime.generation, edge_runtime.tokenizer and edge_runtime.format; edge_runtime.model only for annotations.
"""
