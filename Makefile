# cxrtrack: train CustomCXRNet on chest X-rays, tracked in MLflow and/or Weights & Biases.
# `make` or `make help` lists the targets. Variables: DATA, EPOCHS, BATCH_SIZE, LR, TRACKER, CONFIG, PORT, ...

.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PORT        ?= 5000
MLFLOW_URI  ?= $(or $(value MLFLOW_TRACKING_URI),sqlite:///$(CURDIR)/mlflow.db)
CONFIG      ?= configs/train.yaml
TRACKER     ?= mlflow

# User variables reach the scripts as data, never as shell code: `$(value X)` takes the text as typed
# (make does not expand it), `shq` single-quotes it for the shell ('it'\''s'), and `unexport` keeps make
# from expanding them into the recipes' environment. A backquote, quote, $(...) or ; in DATA or RUN_NAME
# is therefore part of the name. ARGS is split into words on spaces (by make, not by the shell).
# (`unexport` after the defaults above: it defines a variable, so a later `?=` would not assign it.)
USER_VARS   := DATA EPOCHS BATCH_SIZE LR IMAGE_SIZE RUN_NAME ARGS CONFIG TRACKER CHECKPOINT RUN_ID MODEL OUT OUTPUTS PORT MLFLOW_URI \
               TRIALS WORKERS STUDY STORAGE SPACE ENGINE SWEEP_ID QUICK REPEATS TRACKERS EXPERIMENT TAGS RESUME FOLDS SEEDS SIZES \
               THREADS CONCURRENCY TO_RECORDED_URI SCALE PHASES SCALE_BUDGET
unexport $(USER_VARS)

# A misspelt variable (`make train-custom EPOCH=3`) must not be ignored while a 40-epoch run starts: any variable
# given on the command line that this Makefile does not know stops make before a target runs.
KNOWN_VARS  := $(USER_VARS) PY VENV PYTHON MLFLOW_TRACKING_URI
comma       := ,
UNKNOWN_VARS := $(filter-out $(KNOWN_VARS),$(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v))))
ifneq ($(strip $(UNKNOWN_VARS)),)
$(error unknown variable $(UNKNOWN_VARS)$(foreach v,$(UNKNOWN_VARS),$(if $(filter $(v)%,$(KNOWN_VARS)), (did you mean $(firstword $(filter $(v)%,$(KNOWN_VARS)))?))). Nothing was run. Known variables: $(sort $(USER_VARS)) (see `make help`))
endif
shq          = '$(subst ','\'',$(1))'

# A control character in a variable is refused before any recipe runs: make runs each line of an expanded
# recipe as a command of its own, so a newline in RUN_NAME would start a new shell command whatever the
# quoting. A newline is found by make itself; the other control characters (tab, carriage return, escape,
# ...) by one shell call over the values the user set (make drops newlines from a $(shell) command).
define newline


endef
USER_SET     := $(strip $(foreach v,$(KNOWN_VARS),$(if $(filter command line environment environment override,$(origin $(v))),$(v))))
CONTROL_VARS := $(strip $(foreach v,$(USER_SET),$(if $(findstring $(newline),$(value $(v))),$(v))))
ifeq ($(CONTROL_VARS)$(if $(USER_SET),,none),)
CONTROL_VARS := $(shell export LC_ALL=C; $(foreach v,$(USER_SET),printf '%s' $(call shq,$(value $(v))) | grep -q '[[:cntrl:]]' && echo $(v);) true)
endif
ifneq ($(strip $(CONTROL_VARS)),)
$(error $(strip $(CONTROL_VARS)): the value holds a control character (a newline, tab, carriage return, escape: any character below 0x20, or DEL). Nothing was run: make would run each line of a value as a command of its own, and no name, path or URI needs such a character. Give the value on one line without them)
endif

uri          = $(if $(filter command line environment,$(origin MLFLOW_URI)),$(value MLFLOW_URI),$(MLFLOW_URI))
opt          = $(if $(value $(1)),$(2) $(call shq,$(value $(1))))

# Optional flags shared by the training and evaluation targets. Honest model selection (docs/model-quality.md):
# FOLDS=k cross-validates on train/, SEEDS=n repeats with n seeds.
DATA_ARG    = $(call opt,DATA,--data)
TRAIN_ARGS  = $(DATA_ARG) $(call opt,EPOCHS,--epochs) $(call opt,BATCH_SIZE,--batch-size) $(call opt,LR,--lr) \
              $(call opt,IMAGE_SIZE,--image-size) $(call opt,RUN_NAME,--run-name) $(call opt,RESUME,--resume) \
              $(call opt,FOLDS,--folds) $(call opt,SEEDS,--seeds) $(call opt,THREADS,--threads) \
              $(if $(value EXPERIMENT),--set $(call shq,experiment=$(value EXPERIMENT))) \
              $(foreach tag,$(subst $(comma), ,$(value TAGS)),--set $(call shq,tracking.tags.$(tag))) \
              $(foreach word,$(value ARGS),$(call shq,$(word)))

.PHONY: help install download mlflow-quick wandb-quick both-quick mlflow-train wandb-train train-custom \
        mlflow-tune wandb-tune tune-benchmark mlflow-ui wandb-sync evaluate replay compare speed-benchmark threads-benchmark test test-fast \
        lint clean clean-runs

help: ## Show this help
	@echo "Usage: make <target> [DATA=<folder>] [EPOCHS=n] ..."
	@echo
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'
	@echo
	@echo "DATA defaults to the downloaded Kaggle data (make download), else a generated synthetic set."
	@echo "Training targets also take EXPERIMENT=, TAGS=a=b,c=d, RESUME=<run folder | run id> and THREADS=<n | auto>;"
	@echo "unknown variables are refused."

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

install: $(PY) ## Create .venv and install the project with its dev tools (offline-safe, ~3-4 min)
	$(PY) -m pip install --quiet -e '.[dev]'
	@$(PY) -c "import torch, torchvision, mlflow, wandb; print(f'installed: torch {torch.__version__}, torchvision {torchvision.__version__}, mlflow {mlflow.__version__}, wandb {wandb.__version__}')"

download: ## Download the Kaggle dataset into data/kaggle (needs network; finds existing data offline)
	$(PY) scripts/download.py

mlflow-quick: ## Quick run (~12 s on 2 CPU cores) tracked in MLflow
	$(PY) scripts/train.py --config configs/quick.yaml --tracker mlflow $(TRAIN_ARGS)

wandb-quick: ## Quick run (~12 s on 2 CPU cores) tracked in W&B (offline without an API key)
	$(PY) scripts/train.py --config configs/quick.yaml --tracker wandb $(TRAIN_ARGS)

both-quick: ## Quick run tracked in MLflow and W&B at once
	$(PY) scripts/train.py --config configs/quick.yaml --tracker both $(TRAIN_ARGS)

mlflow-train: ## Full training run (configs/train.yaml) tracked in MLflow
	$(PY) scripts/train.py --config configs/train.yaml --tracker mlflow $(TRAIN_ARGS)

wandb-train: ## Full training run (configs/train.yaml) tracked in W&B
	$(PY) scripts/train.py --config configs/train.yaml --tracker wandb $(TRAIN_ARGS)

train-custom: ## Your settings: make train-custom EPOCHS=50 BATCH_SIZE=64 LR=0.0005 TRACKER=both [CONFIG= FOLDS=5 SEEDS=3 EXPERIMENT= TAGS=a=b,c=d RESUME=outputs/<run>]
	$(PY) scripts/train.py --config $(call shq,$(value CONFIG)) --tracker $(call shq,$(value TRACKER)) $(TRAIN_ARGS)

# CONFIG= given by the user (command line or environment), else empty: tune and compare have their own defaults.
USER_CONFIG = $(if $(filter command line environment,$(origin CONFIG)),$(value CONFIG))

# Tuning: CONFIG= is the config every trial starts from (default: the quick one), SPACE= the search space.
TUNE_ARGS   = --config $(call shq,$(or $(USER_CONFIG),configs/tune/quick.yaml)) $(DATA_ARG) $(call opt,TRIALS,--trials) \
              $(call opt,WORKERS,--workers) $(call opt,STUDY,--study) $(call opt,STORAGE,--storage) \
              $(call opt,EPOCHS,--epochs) $(if $(value THREADS),--set $(call shq,threads=$(value THREADS))) \
              $(foreach word,$(value ARGS),$(call shq,$(word)))

mlflow-tune: ## Quick Optuna search (~3 min): parent + nested trial runs in MLflow [TRIALS= WORKERS= STUDY= STORAGE= CONFIG= SPACE=]
	$(PY) scripts/tune.py --tracker mlflow --space $(call shq,$(or $(value SPACE),configs/mlflow/hyperparameters.yaml)) $(TUNE_ARGS)

wandb-tune: ## Quick sweep from a W&B sweep file: W&B-server sweep online, local Optuna sweep offline [same + SWEEP_ID= ENGINE=]
	$(PY) scripts/tune.py --tracker wandb --space $(call shq,$(or $(value SPACE),configs/wandb/sweep.yaml)) $(TUNE_ARGS) \
		$(call opt,ENGINE,--engine) $(call opt,SWEEP_ID,--sweep-id)

tune-benchmark: ## Measure per-trial overhead and trials/minute with 1 and 2 workers (writes outputs/tune/benchmark.md)
	$(PY) scripts/tune_benchmark.py $(DATA_ARG) $(call opt,TRIALS,--trials)

mlflow-ui: ## Open the MLflow UI at http://127.0.0.1:5000 and print the latest run's page (PORT=... to change)
	@$(PY) scripts/mlflow_ui.py --uri $(call shq,$(uri)) --port $(call shq,$(value PORT))

wandb-sync: ## Upload offline W&B runs (needs network and `wandb login`)
	@runs=$$(ls -d wandb/offline-run-* 2>/dev/null); \
	if [ -z "$$runs" ]; then echo "No offline W&B runs in ./wandb to sync."; exit 0; fi; \
	$(VENV)/bin/wandb sync --yes || { echo; \
	  echo "error: the upload failed. make wandb-sync needs network access to W&B and an API key: run"; \
	  echo "       .venv/bin/wandb login (or set WANDB_API_KEY), then make wandb-sync again. Nothing was lost:"; \
	  echo "       the offline runs stay in ./wandb until they are uploaded."; exit 1; }

evaluate: ## Evaluate on the test split and log it back to the run: MODEL=models:/CustomCXRNet@champion | wandb:<e>/<p>/customcxrnet:champion | CHECKPOINT=<best.pt> | RUN_ID=<mlflow run>
	$(PY) scripts/evaluate.py $(call opt,MODEL,--model) $(call opt,CHECKPOINT,--checkpoint) $(call opt,RUN_ID,--run-id) $(DATA_ARG) \
		$(call opt,OUT,--out)

replay: ## Send MLflow calls spooled during an outage (outputs/*/spool) to the configured store; close runs of killed processes
	$(PY) scripts/replay.py $(call opt,OUTPUTS,--outputs) $(if $(value TO_RECORDED_URI),--to-recorded-uri) \
		$(if $(filter command line environment,$(origin MLFLOW_URI)),--tracking-uri $(call shq,$(value MLFLOW_URI)))

compare: ## Measure MLflow vs W&B on one training: make compare [QUICK=1] [REPEATS=3] [TRACKERS=...] [CONFIG=...] [DATA=...] [SCALE=1 SCALE_BUDGET=s PHASES=scale]
	$(PY) scripts/compare.py $(if $(value QUICK),--quick) $(call opt,REPEATS,--repeats) $(call opt,TRACKERS,--trackers) \
		$(if $(value SCALE),--scale) $(call opt,SCALE_BUDGET,--scale-budget) $(call opt,PHASES,--only) \
		$(if $(USER_CONFIG),--config $(call shq,$(USER_CONFIG))) $(DATA_ARG) $(foreach word,$(value ARGS),$(call shq,$(word)))

speed-benchmark: ## Images/s of the training step: channels-last, torch.compile, bf16, batched augmentation (writes outputs/speed/)
	$(PY) scripts/benchmark_speed.py $(call opt,REPEATS,--repeats) $(call opt,SIZES,--sizes) \
		$(foreach word,$(value ARGS),$(call shq,$(word)))

threads-benchmark: ## Images/s of 1, 2, 3 trainings at once per thread setting (writes outputs/threads/) [CONCURRENCY=1,2,3 REPEATS=]
	$(PY) scripts/benchmark_threads.py $(DATA_ARG) $(call opt,CONCURRENCY,--concurrency) $(call opt,REPEATS,--repeats) \
		$(foreach word,$(value ARGS),$(call shq,$(word)))

# pytest-xdist runs one test file per worker, one worker more than cores: the suite waits on servers, signals and
# subprocesses much of the time, and each test process uses one torch thread (tests/conftest.py). Fresh clones on 2
# cores: 3 workers took 5 min 32 s idle and 8 min 36 s beside two busy processes, where 2 took 7 min 12 s and
# 11 min 44 s. TEST_WORKERS=N to choose.
TEST_WORKERS ?= $(shell echo $$(( $$(nproc 2>/dev/null || echo 1) + 1 )))
test: ## Run the test suite (no network; 5-5.5 min on 2 idle cores)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: ## Run the tests not marked slow
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

lint: ## Check the code with ruff and type-check src/ with mypy (its settings: [tool.mypy] in pyproject.toml)
	$(VENV)/bin/ruff check src scripts tests
	$(PY) -m mypy

clean: ## Remove caches and build files (never runs, data or outputs)
	rm -rf .pytest_cache .ruff_cache build dist src/*.egg-info
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

clean-runs: ## Delete tracked runs, studies, outputs and compare reports (mlflow.db, optuna.db, mlartifacts/, wandb/, outputs/, reports/) after asking
	@found=$$(ls -d mlflow.db optuna.db mlartifacts wandb outputs reports 2>/dev/null); \
	if [ -z "$$found" ]; then echo "No tracked runs, studies, outputs or reports here: nothing to delete."; exit 0; fi; \
	echo "This deletes every tracked run, tuning study and compare report:"; du -sh $$found; \
	[ ! -d reports ] || ls -d reports/*/* 2>/dev/null | sed 's/^/  report: /'; \
	read -r -p "Type 'yes' to delete them: " answer && [ "$$answer" = yes ] || { echo "Nothing deleted."; exit 1; }; \
	rm -rf $$found && echo "Deleted: "$$found
