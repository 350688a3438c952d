# ssl_zoo — every target creates the virtualenv first if it is missing, so a fresh clone needs no manual step.
SHELL := /bin/bash
PY ?= python3.11
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.ssl_zoo-installed

# The methods are the folders of experiments/ with a demo.yaml.
METHODS := $(sort $(patsubst experiments/%/demo.yaml,%,$(wildcard experiments/*/demo.yaml)))
METHOD ?= simsiam
CONFIG ?= experiments/$(METHOD)/demo.yaml
ARGS ?=
DEMO ?= data/demo
# Evaluation jobs: CKPT=<checkpoint> (the backbone and its settings come from it); without one, the randomly
# initialised BACKBONE at IMG_SIZE px (the baseline).
CKPT ?=
BACKBONE ?=
IMG_SIZE ?=
SWEEP ?=
# Scaling out (experiments/launch/README.md): GPUS per node and NODES override the config's trainer.devices / num_nodes;
# NODES > 1 prints the sbatch command (SUBMIT=1 submits it); RESUME=1 continues the newest run of the config's
# name from its checkpoints/last.ckpt.
NODES ?=
GPUS ?=
RESUME ?=
SUBMIT ?=
SLURM_LOG_DIR ?= runs/slurm
COUNT ?=
LOCAL ?=
PYTEST_ARGS ?=

.PHONY: help install demo-data demo-shards check-method pretrain linear gamp finetune knn detect segment sweep bench bench-quality mutants lint test test-fast test-ddp clean

help:
	@echo "Pre-training:  make pretrain METHOD=<method> [CONFIG=experiments/<method>/<config>.yaml] [ARGS='--trainer.max_epochs 5']"
	@echo "               [GPUS=8] [NODES=2 (prints the sbatch command; SUBMIT=1 submits it)] [RESUME=1]"
	@echo "Methods and their configs (METHOD runs demo.yaml, minutes on a CPU; cpu.yaml: a CPU recipe that learns visibly in ~10 minutes;"
	@echo "the others are paper configs for GPUs; subfolders hold overlays given after their base config):"
	@$(foreach m,$(METHODS),echo "  $(m): $(filter-out tables.yaml,$(notdir $(wildcard experiments/$(m)/*.yaml)))$(if $(wildcard experiments/$(m)/*/*.yaml), + overlays $(patsubst experiments/$(m)/%,%*.yaml,$(sort $(dir $(wildcard experiments/$(m)/*/*.yaml)))))";)
	@echo "  streaming-shard overlays (make demo-shards first): experiments/shards/<method>.yaml"
	@echo "  paper tables and the commands of their rows: $(PYTHON) -m ssl_zoo.tables experiments/<method>/tables.yaml"
	@echo "Evaluation of a checkpoint of any method (backbone, settings and input size from the checkpoint):"
	@echo "  make linear|gamp|finetune|knn CKPT=runs/<method>/<stamp>/checkpoints/last.ckpt [CONFIG=experiments/eval/<config>.yaml] [ARGS=...]"
	@echo "  configs: $(notdir $(wildcard experiments/eval/*.yaml))"
	@echo "Transfer to detection / segmentation of a checkpoint of any method:"
	@echo "  make detect|segment CKPT=runs/<method>/<stamp>/checkpoints/last.ckpt [CONFIG=experiments/transfer/<config>.yaml] [ARGS=...]"
	@echo "  configs: $(notdir $(wildcard experiments/transfer/*.yaml))"
	@echo "  without CKPT (evaluation and transfer): a randomly initialised BACKBONE=resnet18 (at IMG_SIZE=64 for evaluation), the baseline"
	@echo "Published checkpoints (SimSiam, MoCo, DINO, MAE, BEiT, SimMIM, OpenAI CLIP, timm, torchvision) go in as CKPT=...; to see what"
	@echo "  one holds and write it as an ssl_zoo checkpoint: $(PYTHON) -m ssl_zoo.checkpoints.convert IN.pth OUT.pth"
	@echo "Other jobs:    make sweep SWEEP=experiments/sweeps/<file>.yaml [LOCAL=1] [COUNT=N] | demo-data | demo-shards | bench | bench-quality"
	@echo "Development:   make test | test-fast | test-ddp | lint | mutants (planted bugs against the fast suite)"
	@echo "More:          $(PYTHON) -m ssl_zoo --help (methods, configs, jobs); $(PYTHON) -m ssl_zoo fit --help (every option)"
	@echo "Errors print one line and exit with status 2; SSL_ZOO_DEBUG=1 shows the traceback."

# Fails before anything is installed or generated when METHOD names no method (and no CONFIG is given).
check-method:
	@if [ "$(CONFIG)" = "experiments/$(METHOD)/demo.yaml" ] && [ -z "$(filter $(METHOD),$(METHODS))" ]; then \
		echo "error: unknown METHOD=$(METHOD); the methods are: $(METHODS) (experiments/<method>/demo.yaml; make help lists their configs)" >&2; exit 2; fi
	@test -f "$(CONFIG)" || { echo "error: config '$(CONFIG)' not found (METHOD=$(METHOD)); make help lists the configs" >&2; exit 2; }

# torch/torchvision are pinned and installed first (they come from local wheels where the machine has them);
# constraints.txt pins the rest of the resolved environment for reproducible installs.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

$(DEMO)/.complete: | $(STAMP)
	$(PYTHON) -m ssl_zoo.data.demo --out $(DEMO)

demo-data: $(DEMO)/.complete

# The demo set as streaming shards (ssl_zoo/data/README.md, "Streaming shards"): data/demo-shards/{folder,coco,tencent}/{train,val}.
DEMO_SHARDS ?= data/demo-shards
$(DEMO_SHARDS)/.complete: $(DEMO)/.complete
	$(PYTHON) -m ssl_zoo.data.shard folder $(DEMO)/folder $(DEMO_SHARDS)/folder --overwrite
	$(PYTHON) -m ssl_zoo.data.shard coco $(DEMO) $(DEMO_SHARDS)/coco --overwrite
	$(PYTHON) -m ssl_zoo.data.shard tencent $(DEMO) $(DEMO_SHARDS)/tencent --num-classes 12 --overwrite
	@touch $@

demo-shards: $(DEMO_SHARDS)/.complete

# One node: Lightning starts one process per GPU itself. Several nodes: SLURM, one task per GPU.
RESUME_FLAG = $(if $(filter-out 0,$(RESUME)),--resume true,)
DEVICE_FLAGS = $(if $(GPUS),--trainer.accelerator gpu --trainer.devices $(GPUS),) $(if $(NODES),--trainer.num_nodes 1,)
GPUS_PER_NODE = $(or $(GPUS),8)
shell_quote = '$(subst ','\'',$(1))'
SBATCH_CMD = NODES=$(NODES) GPUS_PER_NODE=$(GPUS_PER_NODE) CONFIG=$(CONFIG) RESUME=$(if $(RESUME_FLAG),1,0) \
	ARGS=$(call shell_quote,$(ARGS)) sbatch --nodes=$(NODES) --ntasks-per-node=$(GPUS_PER_NODE) \
	--gpus-per-node=$(GPUS_PER_NODE) --output=$(SLURM_LOG_DIR)/%x-%j.out experiments/launch/slurm.sbatch
pretrain: check-method $(STAMP) $(DEMO)/.complete
ifeq ($(filter-out 1,$(NODES)),)
	$(PYTHON) -m ssl_zoo fit --config $(CONFIG) $(DEVICE_FLAGS) $(RESUME_FLAG) $(ARGS)
else
	@echo $(call shell_quote,$(SBATCH_CMD))
	@$(if $(filter-out 0,$(SUBMIT)),mkdir -p $(SLURM_LOG_DIR) && $(SBATCH_CMD),echo "(not submitted: add SUBMIT=1, or run the line above on the cluster's login node)")
endif

# Evaluation jobs: CKPT=path/to/last.ckpt; empty = the randomly initialised BACKBONE (resnet18) at IMG_SIZE (64).
EVAL_CKPT_ARG = $(if $(CKPT),--model.init_args.ckpt $(CKPT) $(if $(BACKBONE),--model.init_args.backbone $(BACKBONE),) \
	$(if $(IMG_SIZE),--model.init_args.img_size $(IMG_SIZE),),--model.init_args.backbone $(or $(BACKBONE),resnet18) \
	--model.init_args.img_size $(or $(IMG_SIZE),64))
linear: $(STAMP) $(DEMO)/.complete
	$(PYTHON) -m ssl_zoo fit --config $(or $(filter-out experiments/$(METHOD)/demo.yaml,$(CONFIG)),experiments/eval/linear_demo.yaml) $(EVAL_CKPT_ARG) $(ARGS)
gamp: $(STAMP) $(DEMO)/.complete
	$(PYTHON) -m ssl_zoo fit --config $(or $(filter-out experiments/$(METHOD)/demo.yaml,$(CONFIG)),experiments/eval/gamp_demo.yaml) $(EVAL_CKPT_ARG) $(ARGS)
finetune: $(STAMP) $(DEMO)/.complete
	$(PYTHON) -m ssl_zoo fit --config $(or $(filter-out experiments/$(METHOD)/demo.yaml,$(CONFIG)),experiments/eval/finetune_demo.yaml) $(EVAL_CKPT_ARG) $(ARGS)

knn: $(STAMP) $(DEMO)/.complete
	$(PYTHON) -m ssl_zoo validate --config $(or $(filter-out experiments/$(METHOD)/demo.yaml,$(CONFIG)),experiments/eval/knn_demo.yaml) $(EVAL_CKPT_ARG) $(ARGS)

# Transfer to dense prediction (ssl_zoo/transfer/README.md): the demo recipes on data/demo unless CONFIG= names a paper
# recipe in experiments/transfer/. CKPT=path/to/last.ckpt; without it, a randomly initialised backbone (the demo
# recipes: ResNet-18; a paper recipe: its own).
DENSE_CKPT_ARG = $(if $(CKPT),--model.init_args.ckpt $(CKPT) $(if $(BACKBONE),--model.init_args.backbone $(BACKBONE),),\
	$(if $(filter-out experiments/$(METHOD)/demo.yaml,$(CONFIG)),$(if $(BACKBONE),--model.init_args.backbone $(BACKBONE),),\
	--model.init_args.backbone $(or $(BACKBONE),resnet18)))
detect: $(STAMP) $(DEMO)/.complete
	$(PYTHON) -m ssl_zoo fit --config $(or $(filter-out experiments/$(METHOD)/demo.yaml,$(CONFIG)),experiments/transfer/detect_demo.yaml) $(DENSE_CKPT_ARG) $(ARGS)
segment: $(STAMP) $(DEMO)/.complete
	$(PYTHON) -m ssl_zoo fit --config $(or $(filter-out experiments/$(METHOD)/demo.yaml,$(CONFIG)),experiments/transfer/segment_demo.yaml) $(DENSE_CKPT_ARG) $(ARGS)

# wandb sweep + wandb agent when wandb is online; offline or LOCAL=1: the same file runs here, one trial after
# another, each an offline wandb run (summary in runs/sweeps/<name>/<stamp>/). COUNT=N caps the trials,
# ARGS='...' is appended to every trial's command (e.g. a shorter schedule).
sweep: $(STAMP) $(DEMO)/.complete
	@test -n "$(SWEEP)" || { echo "error: give SWEEP=experiments/sweeps/<file>.yaml" >&2; exit 2; }
	@test -f "$(SWEEP)" || { echo "error: sweep file '$(SWEEP)' not found; see experiments/sweeps/" >&2; exit 2; }
	$(PYTHON) -m ssl_zoo.cli.sweep $(SWEEP) $(if $(LOCAL),--local,) $(if $(COUNT),--count $(COUNT),) $(if $(ARGS),-- $(ARGS),)

bench: $(STAMP) $(DEMO)/.complete
	$(PYTHON) -m benchmarks.run_all

# Does every method learn? Each CPU recipe (experiments/<m>/cpu.yaml) x 3 seeds against random init and a
# supervised ceiling: kNN / linear / GAMP probes -> benchmarks/results/quality.json and figures (hours on 2 cores).
# ARGS='--methods mocov2 --seeds 0' narrows it; an interrupted run continues where it stopped.
bench-quality: $(STAMP) $(DEMO)/.complete
	$(PYTHON) -m benchmarks.quality --root $(DEMO) $(ARGS)

# Does the fast suite catch planted bugs? Each mutant in benchmarks/mutants.py is applied to a temporary copy of
# the package and `make test-fast`'s selection runs against it -> benchmarks/results/mutants.json and a table
# (about an hour on 2 cores; not part of `make test`). ARGS='--only ema_weights_swapped' narrows it.
mutants: $(STAMP)
	$(PYTHON) -m benchmarks.mutants $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check ssl_zoo tests benchmarks

# pytest exits 5 when it collected no test: that is a failure here, like any other non-zero code.
define run_pytest
	WANDB_MODE=disabled $(PYTHON) -m pytest $(1) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi; exit $$rc
endef

test: $(STAMP)
	@$(call run_pytest,-q --durations=15)

test-fast: $(STAMP)
	@$(call run_pytest,-q -m "not slow and not distributed")

test-ddp: $(STAMP)
	@$(call run_pytest,-q -m distributed)

clean:
	rm -rf runs lightning_logs wandb .pytest_cache
