# One entry point for every job. A fresh machine needs only python3 (>= 3.10) and make:
# each target creates and fills its own virtual environment in .venv first.
#
#   make run        set up, then the main job (pretrain -> LoRA -> full fine-tuning -> comparison)
#   make test       set up, then lint + the test suite (the nbgrader round trip and the JupyterLab browser
#                   test included) + strict nbval over the notebooks
#   make notebooks  re-execute every notebook in place (outputs committed for nbval)
#   make student    write student versions of the notebooks to build/student/
#   make bench      the benchmark suite (ratios measured side by side)
#   make pdf        rebuild comentario_LoRA.pdf from the experiment's results

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch release this project is tested with. Override for another, e.g.
#   make test TORCH='torch>=2.2'
TORCH ?= torch==2.13.0
RUN_ARGS ?=
RUN_DIR ?= runs/builtin-cpu
# Seeds of the run the PDF quotes (make pdf SEEDS=3: mean ± spread over seeds 0, 1, 2).
SEEDS ?= 1

.PHONY: setup run test lint browser notebooks student bench pdf clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

run: setup
	$(PY) -m lora_lab run $(RUN_ARGS)

lint: setup
	$(PY) -m ruff check .

test: lint browser
	$(PY) -m pytest --nbval --nbval-current-env tests notebooks

# tests/test_browser.py drives Debian's chromium through Playwright's Python package (a test dependency).
# Installed here when missing and make runs as root with apt (CI); otherwise that test is skipped, saying so.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium for the browser test (apt-get)"; \
		apt-get install -y -qq chromium >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; \
	fi

notebooks: setup
	$(PY) -m lora_lab.notebook_tools execute notebooks

student: setup
	$(PY) -m lora_lab.notebook_tools student notebooks build/student

bench: setup
	$(PY) benchmarks/bench.py --threads 1

pdf: setup
	$(PY) -m lora_lab run --profile cpu --sweep --seeds $(SEEDS) --out $(RUN_DIR)
	$(PY) paper/build.py --run-dir $(RUN_DIR)

clean:
	rm -rf build runs .pytest_cache
