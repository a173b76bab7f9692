# cxrtrack: train CustomCXRNet on chest X-rays, tracked in MLflow and/or Weights & Biases.
# `make` or `make help` lists the targets. Variables: DATA, EPOCHS, BATCH_SIZE, LR, TRACKER, CONFIG, PORT, ...

.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PORT        ?= 5000
MLFLOW_URI  ?= $(or $(MLFLOW_TRACKING_URI),sqlite:///$(CURDIR)/mlflow.db)

# Optional flags shared by the training and evaluation targets.
DATA_ARG    = $(if $(DATA),--data "$(DATA)")
TRAIN_ARGS  = $(DATA_ARG) $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(BATCH_SIZE),--batch-size $(BATCH_SIZE)) \
              $(if $(LR),--lr $(LR)) $(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE)) $(if $(RUN_NAME),--run-name "$(RUN_NAME)") $(ARGS)

.PHONY: help install download mlflow-quick wandb-quick both-quick mlflow-train wandb-train train-custom \
        mlflow-tune wandb-tune tune-benchmark mlflow-ui wandb-sync evaluate compare test test-fast lint clean clean-runs

help: ## Show this help
	@echo "Usage: make <target> [DATA=<folder>] [EPOCHS=n] ..."
	@echo
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'
	@echo
	@echo "DATA defaults to the downloaded Kaggle data (make download), else a generated synthetic set."

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

install: $(PY) ## Create .venv and install the project with its dev tools (offline-safe, ~3-4 min)
	$(PY) -m pip install --quiet -e '.[dev]'
	@$(PY) -c "import torch, torchvision, mlflow, wandb; print(f'installed: torch {torch.__version__}, torchvision {torchvision.__version__}, mlflow {mlflow.__version__}, wandb {wandb.__version__}')"

download: ## Download the Kaggle dataset into data/kaggle (needs network; finds existing data offline)
	$(PY) scripts/download.py

mlflow-quick: ## Quick run (~1 min on CPU) tracked in MLflow
	$(PY) scripts/train.py --config configs/quick.yaml --tracker mlflow $(TRAIN_ARGS)

wandb-quick: ## Quick run (~1 min on CPU) tracked in W&B (offline without an API key)
	$(PY) scripts/train.py --config configs/quick.yaml --tracker wandb $(TRAIN_ARGS)

both-quick: ## Quick run tracked in MLflow and W&B at once
	$(PY) scripts/train.py --config configs/quick.yaml --tracker both $(TRAIN_ARGS)

mlflow-train: ## Full training run (configs/train.yaml) tracked in MLflow
	$(PY) scripts/train.py --config configs/train.yaml --tracker mlflow $(TRAIN_ARGS)

wandb-train: ## Full training run (configs/train.yaml) tracked in W&B
	$(PY) scripts/train.py --config configs/train.yaml --tracker wandb $(TRAIN_ARGS)

CONFIG  ?= configs/train.yaml
TRACKER ?= mlflow
train-custom: ## Your settings: make train-custom EPOCHS=50 BATCH_SIZE=64 LR=0.0005 TRACKER=both [CONFIG=...]
	$(PY) scripts/train.py --config $(CONFIG) --tracker $(TRACKER) $(TRAIN_ARGS)

# Tuning: CONFIG= is the config every trial starts from (default: the quick one), SPACE= the search space.
TUNE_CONFIG = $(if $(filter command line environment,$(origin CONFIG)),$(CONFIG),configs/tune/quick.yaml)
TUNE_ARGS   = --config "$(TUNE_CONFIG)" $(DATA_ARG) $(if $(TRIALS),--trials $(TRIALS)) $(if $(WORKERS),--workers $(WORKERS)) \
              $(if $(STUDY),--study "$(STUDY)") $(if $(STORAGE),--storage "$(STORAGE)") $(if $(EPOCHS),--epochs $(EPOCHS)) $(ARGS)

mlflow-tune: ## Quick Optuna search (~3 min): parent + nested trial runs in MLflow [TRIALS= WORKERS= STUDY= STORAGE= CONFIG= SPACE=]
	$(PY) scripts/tune.py --tracker mlflow --space "$(or $(SPACE),configs/mlflow/hyperparameters.yaml)" $(TUNE_ARGS)

wandb-tune: ## Quick sweep from a W&B sweep file: W&B-server sweep online, local Optuna sweep offline [same + SWEEP_ID= ENGINE=]
	$(PY) scripts/tune.py --tracker wandb --space "$(or $(SPACE),configs/wandb/sweep.yaml)" $(TUNE_ARGS) \
		$(if $(ENGINE),--engine $(ENGINE)) $(if $(SWEEP_ID),--sweep-id $(SWEEP_ID))

tune-benchmark: ## Measure per-trial overhead and trials/minute with 1 and 2 workers (writes outputs/tune/benchmark.md)
	$(PY) scripts/tune_benchmark.py $(DATA_ARG) $(if $(TRIALS),--trials $(TRIALS))

mlflow-ui: ## Open the MLflow UI at http://127.0.0.1:5000 (PORT=... to change; same store as the runs)
	@case "$(MLFLOW_URI)" in http://*|https://*) \
	  echo "Runs go to the tracking server $(MLFLOW_URI): open it in your browser."; exit 0;; esac; \
	echo "MLflow UI: http://127.0.0.1:$(PORT)  (store: $(MLFLOW_URI); Ctrl-C to stop)"; \
	MLFLOW_DISABLE_TELEMETRY=true $(VENV)/bin/mlflow ui --backend-store-uri "$(MLFLOW_URI)" --host 127.0.0.1 --port $(PORT) --workers 1

wandb-sync: ## Upload offline W&B runs (needs network and `wandb login`)
	@runs=$$(ls -d wandb/offline-run-* 2>/dev/null); \
	if [ -z "$$runs" ]; then echo "No offline W&B runs in ./wandb to sync."; exit 0; fi; \
	$(VENV)/bin/wandb sync --yes || { echo; \
	  echo "error: the upload failed. make wandb-sync needs network access to W&B and an API key: run"; \
	  echo "       .venv/bin/wandb login (or set WANDB_API_KEY), then make wandb-sync again. Nothing was lost:"; \
	  echo "       the offline runs stay in ./wandb until they are uploaded."; exit 1; }

evaluate: ## Evaluate on the test split: make evaluate CHECKPOINT=outputs/<run>/checkpoints/best.pt | RUN_ID=<mlflow run>
	$(PY) scripts/evaluate.py $(if $(CHECKPOINT),--checkpoint "$(CHECKPOINT)") $(if $(RUN_ID),--run-id $(RUN_ID)) \
		$(DATA_ARG) $(if $(OUT),--out "$(OUT)")

compare: ## Measure MLflow vs W&B on one training: make compare [QUICK=1] [REPEATS=3] [TRACKERS=...] [CONFIG=...] [DATA=...]
	$(PY) scripts/compare.py $(if $(QUICK),--quick) $(if $(REPEATS),--repeats "$(REPEATS)") \
		$(if $(TRACKERS),--trackers "$(TRACKERS)") $(if $(filter command line environment,$(origin CONFIG)),--config "$(CONFIG)") \
		$(DATA_ARG) $(ARGS)

test: ## Run the test suite (no network; a few minutes)
	$(PY) -m pytest

test-fast: ## Run the tests not marked slow
	$(PY) -m pytest -m "not slow"

lint: ## Check the code with ruff
	$(VENV)/bin/ruff check src scripts tests

clean: ## Remove caches and build files (never runs, data or outputs)
	rm -rf .pytest_cache .ruff_cache build dist src/*.egg-info
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

clean-runs: ## Delete tracked runs, studies and outputs (mlflow.db, optuna.db, mlartifacts/, wandb/, outputs/) after asking
	@echo "This deletes every tracked run and tuning study: mlflow.db optuna.db mlartifacts/ wandb/ outputs/"
	@read -r -p "Type 'yes' to delete them: " answer && [ "$$answer" = yes ] || { echo "Nothing deleted."; exit 1; }
	rm -rf mlflow.db optuna.db mlartifacts wandb outputs
