"""Resident memory: buffers committed page by page (pages), the planner that predicts a session's peak from a manifest
alone (budget), and fresh-process measurement for memory regression tests (testing). May import edge_runtime.format,
edge_runtime.generation.stats, edge_runtime.backends (to know what a backend keeps resident) and
edge_runtime.tokenizer.tokenizer (which implementation a load will parse with).
"""
