PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test bench bench-peers bench-compress mutation clean

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/digits/run_demo.py

test: $(VENV)/.installed
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mkdocs build --strict --quiet
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder

# the fp32 model and the TinyLlama shape (bf16, HF-sharded; ~11 GB of disk), best of 3: docs/benchmarks.md
bench: $(VENV)/.installed
	$(PY) benchmarks/bench_engine.py $(or $(BENCH_ARGS),--sizes 0.5 --shapes tinyllama-1.1b --repeat 3 --markdown)
	$(PY) benchmarks/bench_peft.py $(BENCH_PEFT_ARGS)

# mergekit (pinned) in its own virtualenv under bench-out/peers, against us on the same checkpoints
bench-peers: $(VENV)/.installed
	$(PY) benchmarks/bench_peers.py $(BENCH_ARGS)

# compressed task vectors on the digits example: size against accuracy
bench-compress: $(VENV)/.installed
	$(PY) benchmarks/bench_compress.py $(BENCH_ARGS)

# mutation testing with mutmut (pinned in the `mutation` extra), one target after another under
# nice; not part of `make test`. MUTATION_ARGS="lora --subset": docs/mutation.md
$(VENV)/.mutation-installed: $(VENV)/.installed
	$(PIP) install -c constraints.txt -e '.[mutation]'
	touch $@

mutation: $(VENV)/.mutation-installed
	$(PY) tools/mutation.py $(MUTATION_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build site *.egg-info mutation-out
