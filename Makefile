# Every target sets itself up: a fresh clone needs no manual step.
PY       ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
# The CPU build of torch that lies on these machines' disk; a looser pin pulls a multi-GB CUDA build.
TORCH    ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup data data-full test test-slow eval-small eval-full bench bench-curves study transfer clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[bench,test,loggers,sweeps]"
	touch $(STAMP)

# DATA=<data config> picks another equation (advection1d_small, reacdiff1d_small, mixed_small, ...)
data: setup
	$(BIN)/python -m ups_lightning.data.generate data=$(or $(DATA),burgers1d_small)

data-full: setup
	$(BIN)/python -m ups_lightning.data.generate data=$(or $(DATA),burgers1d)

# PYTHONDONTWRITEBYTECODE: no __pycache__ in the checkout (pytest's cache is off in pyproject.toml)
test: setup
	PYTHONDONTWRITEBYTECODE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: setup
	PYTHONDONTWRITEBYTECODE=1 $(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

eval-small: setup
	$(BIN)/python -m ups_lightning.pipeline experiment=eval_small $(if $(DATA),data=$(DATA))

eval-full: setup
	$(BIN)/python -m ups_lightning.pipeline experiment=eval_full $(if $(DATA),data=$(DATA))

# BUDGET=<minutes per learned model>, SEEDS=<n training seeds>, DATA=<data config: burgers1d (default),
# advection1d, reacdiff1d>, BENCH_ARGS=<more overrides>; the data is made when missing
bench: setup
	$(BIN)/python -m ups_lightning.bench $(if $(DATA),data=$(DATA)) $(if $(BUDGET),budget_min=$(BUDGET)) $(if $(SEEDS),"seeds=[$(shell seq -s, 0 $$(($(SEEDS)-1)))]") $(BENCH_ARGS)

# learning curves: test nRMSE at 2.5..40 minutes for ours and the peer best on validation, beside
# PDEBench's published figures (curves.png); finished models are reused, so it completes in parts
bench-curves: setup
	$(BIN)/python -m ups_lightning.bench "curve_budgets=[2.5,5,10,20,40]" $(if $(DATA),data=$(DATA)) $(if $(SEEDS),"seeds=[$(shell seq -s, 0 $$(($(SEEDS)-1)))]") $(BENCH_ARGS)

# the capacity x TTC study (docs/STUDY.md; about 75 min on 2 idle cores); STUDY_ARGS=<more overrides>
study: setup
	$(BIN)/python -m ups_lightning.study $(STUDY_ARGS)

# pretrained on other equations vs from scratch on one never seen, at 10/30/100% of its data
# (docs/TRANSFER.md); TRANSFER_ARGS=<more overrides>
transfer: setup
	$(BIN)/python -m ups_lightning.transfer $(TRANSFER_ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
