"""From logits to text: samplers and logits processors (sampling), the layered generation loop (generate), its one
streaming form (stream), the log-probs of a given sequence (scoring) and what a generation cost (stats). Backend-
agnostic: it drives any `backends.base.Backend` it is given and imports edge_runtime.tokenizer and
edge_runtime.errors, never a concrete backend.
"""
