"""The float reference and the bundle's distance from it: the source model in transformers' own code (reference), the
probes stored in every bundle (probes), the held-out evaluation written to the manifest (evaluate) and where its
text comes from (eval_domains). May import export.sources, edge_runtime.format, edge_runtime.quality and
edge_runtime.backends; never export.pipeline or a CLI.
"""
