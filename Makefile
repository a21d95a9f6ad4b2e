# deepseek-template. Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, on its own, so no later install swaps in another build. This pair is the one tested
# here; on another machine pick the build for your CUDA: make test TORCH="torch==... torchvision==..."
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: help demo test lint clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r requirements-dev.txt
	# DeepSpeed as pure Python (no CUDA op is built, none is needed): the tests check the pieces of
	# trainer=deepspeed that run without a GPU. It builds against the torch above, hence no isolation.
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	touch $@

demo: $(STAMP)  ## bake the default project into build/demo, train the tiny GPT on Shakespeare, print a sample
	rm -rf build/demo
	$(BIN)/cookiecutter --no-input --output-dir build/demo . git_init=no
	$(BIN)/pip install -q --no-deps -e build/demo/my-paper
	$(MAKE) -C build/demo/my-paper demo VENV=$(abspath $(VENV))

# Three workers on CI's two cores, as the suites also wait (SLURM's minute-long time limits, process
# starts, servers); the times with two and three workers are in the README.
test: $(STAMP) lint  ## lint, then the template's tests: bake every module combination and run each baked project's tests
	$(BIN)/python -m pytest -n 3 --maxschedchunk 1 --durations=10 tests/

lint: $(STAMP)  ## ruff on the template's own Python (hooks, tests)
	$(BIN)/ruff check hooks tests
	$(BIN)/ruff format --check hooks tests

clean:  ## remove build/ and the virtualenv
	rm -rf build $(VENV) .pytest_cache
