# One entry point for every job. A fresh machine needs only python3 (>= 3.10) and make:
# each target creates and fills its own virtual environment in .venv first.
#
#   make run        set up, then the main job (pretrain -> LoRA -> full fine-tuning -> comparison)
#   make test       set up, then lint + the test suite + strict nbval over the notebooks
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

.PHONY: setup run test lint notebooks student bench pdf clean

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

test: lint
	$(PY) -m pytest --nbval --nbval-current-env tests notebooks

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
