# steel-fsd: `make demo` and `make test` set everything up on a fresh machine (idempotent).
# VENV may point at an existing environment (e.g. one with Detectron2 built from source): it is reused.
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.steel_fsd_deps
PYTEST_ARGS ?=

.PHONY: env demo test test-fast bench fewshot-demo clean-demo

env: $(DEPS_STAMP)
	@$(PY) -c "import steel_fsd, pathlib; assert pathlib.Path(steel_fsd.__file__).resolve().parent == pathlib.Path('steel_fsd').resolve()" 2>/dev/null \
	  || { echo "[make] installing steel_fsd (editable) from $(CURDIR)"; $(PY) -m pip install -q --no-deps --no-build-isolation -e .; }

$(DEPS_STAMP): requirements.txt tools/install_detectron2.py setup.py
	@test -x $(PY) || { echo "[make] creating virtual environment $(VENV)"; python3 -m venv $(VENV); }
	@echo "[make] installing requirements into $(VENV) (torch/torchvision: a few minutes the first time)"
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) tools/install_detectron2.py
	@touch $(DEPS_STAMP)

demo: env
	$(PY) tools/demo.py

test: env
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

# The suite without the end-to-end training runs (marked slow): for a quick check while editing.
test-fast: env
	$(PY) -m pytest tests -q -m "not slow" $(PYTEST_ARGS)

# The few-shot protocol on the synthetic datasets at CPU size (resumable): tables in output/fewshot_synth/report.md.
FEWSHOT_ARGS ?= --settings base_novel cross --methods prototype finetune
fewshot-demo: env
	$(PY) tools/make_synthetic.py --out $${STEEL_FSD_DATASETS:-datasets}
	$(PY) tools/run_fewshot.py --config configs/protocols/synth_cpu.yaml $(FEWSHOT_ARGS)

bench: env
	$(PY) benchmarks/run_all.py
