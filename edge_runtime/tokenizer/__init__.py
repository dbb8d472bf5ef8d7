"""Text <-> token ids: the compact pure-Python reader of tokenizer.json (bpe, with its pre-tokenizers in pretokenize),
the Tokenizer a Model uses (tokenizer: the compact reader or the `tokenizers` wheel), and chat messages rendered
with the bundle's Jinja2 template (chat_template). May import edge_runtime.errors and edge_runtime.format; never a
backend.
"""
