# kiln: `make demo` and `make test` do all set-up on a fresh machine (Python 3.11, gcc, cmake).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
KILN := $(VENV)/bin/kiln
export KILN_CACHE ?= $(HOME)/.cache/kiln
LLAMA_VERSION := 0.3.36
STAMP := $(VENV)/.kiln-installed
DEMO := out/demo
SMOL := $(KILN_CACHE)/fixtures/smollm2-135m

R ?= recipes/smollm2.yaml

.PHONY: setup fixtures demo recipe test go-toolchain bench clean

$(STAMP): pyproject.toml scripts/build-llama-wheel.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # the CPU wheel on this machine's disk (DESIGN.md §2)
	scripts/build-llama-wheel.sh $(PY) $(KILN_CACHE)/wheels $(LLAMA_VERSION)
	$(PY) -m pip install -q $$(ls $(KILN_CACHE)/wheels/llama-cpp-python-*/llama_cpp_python-$(LLAMA_VERSION)-*.whl | head -1)
	$(PY) -m pip install -q -e '.[torch,llama,onnx,dev,serve,ray]'
	touch $(STAMP)

setup: $(STAMP)

fixtures: setup
	$(KILN) fixtures

# Go renders Ollama TEMPLATEs in the Modelfile tests, and tmux drives `kiln chat` through a terminal in
# tests/test_chat.py, and Debian's headless Chromium + chromedriver load `kiln serve`'s chat page in
# tests/test_serve_page.py; without them those tests skip with a reason.
go-toolchain:
	@command -v go >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq golang-go) >/dev/null 2>&1 \
	  && echo "installed golang-go" || echo "go unavailable: Modelfile Go-template tests will be skipped"; }
	@command -v tmux >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq tmux) >/dev/null 2>&1 \
	  && echo "installed tmux" || echo "tmux unavailable: kiln chat terminal tests will be skipped"; }
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { (apt-get update -qq \
	  && apt-get install -y -qq --no-install-recommends chromium chromium-driver) >/dev/null 2>&1 && echo "installed chromium" \
	  || echo "chromium unavailable: the kiln serve chat page browser test will be skipped"; }

# The default recipe (recipes/smollm2.yaml): q8_0, q4_k_m, GPTQ q4_0 GGUF + Modelfiles, int4 ONNX,
# eval, bench, report.md — each step cached, so a second `make demo` only runs the generate lines.
demo: fixtures
	$(KILN) recipe run recipes/smollm2.yaml -o $(DEMO)
	$(KILN) inspect $(DEMO)/smollm2-135m.q4_k_m.gguf
	$(KILN) generate $(DEMO)/smollm2-135m.q4_k_m.gguf --chat --max-tokens 32 \
	  --system "Answer the question in one short sentence." --prompt "What is the capital of France?"
	$(KILN) generate $(DEMO)/smollm2-135m.q4_k_m.gguf --chat --prompt "Is the sky blue? Answer yes or no." \
	  --particles 16 --regex "(Yes|No)\." --max-tokens 6 --seed 0
	$(KILN) generate $(DEMO)/smollm2-135m-int4-onnx --chat --max-tokens 32 \
	  --system "Answer the question in one short sentence." --prompt "What is the capital of France?"
	@echo "Artifacts, manifests, Modelfiles and report.md are in $(DEMO)/ (ollama create smollm2 -f $(DEMO)/smollm2-135m.q4_k_m.Modelfile)"

# Any recipe: make recipe R=recipes/qwen2.5-0.5b-instruct-yarn128k.yaml (outputs where its `output:` says, under out/)
recipe: fixtures
	$(KILN) recipe run $(R)

test: fixtures go-toolchain
	$(PY) -m pytest -q --durations=25

# The `bench` extra first (sentencepiece: bench/convert.py runs llama.cpp's convert_hf_to_gguf.py, which
# imports it); llama-cpp-python is already installed from the wheel `setup` built, so nothing compiles.
bench: fixtures
	$(PY) -m pip install -q -e '.[torch,llama,onnx,dev,serve,bench]'
	$(PY) bench/convert.py
	$(PY) bench/onnx_decode.py
	$(PY) bench/quality.py
	$(PY) bench/smc.py
	$(PY) bench/contexts.py   # docs/benchmarks.md: kiln bench across contexts (about an hour)
	$(PY) bench/serve.py      # docs/benchmarks.md's Serving section (contexts.py keeps it when it rewrites the file)
	$(PY) bench/longctx.py --budget 180   # docs/long-context.md: what is missing of the long-range table (committed cells)
	$(PY) bench/longanswer.py --budget 120   # docs/long-context.md: chunk+rank vs truncate vs rope on 2x/4x/8x documents

clean:
	rm -rf out bench/results .pytest_cache
