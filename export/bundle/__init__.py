"""Writing a bundle: the files both exporters write beside the graph (assets: tokenizer, chat template, reference
probes) and the atomic folder writer with its manifest and page-aligned weights.bin (writer). May import
edge_runtime.format and export.graph.builder.
"""
