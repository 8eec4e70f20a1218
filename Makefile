# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The CPU-only torch 2.13 wheel has no matching torchvision; this pinned pair is the known-good set.
PINNED := torch==2.14.1 torchvision==0.29.1 timm==1.0.31

.PHONY: install test demo bench fashion-mnist gpu-wheels clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(PINNED)
	$(PIP) install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Tests that read Fashion-MNIST skip when it is absent; as root the package is installed first.
test: install
	-@$(MAKE) --no-print-directory fashion-mnist
	$(PY) -m pytest -q

fashion-mnist:
	@if dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get install -y -q dataset-fashion-mnist \
	  || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; \
	else echo "Fashion-MNIST is missing. Install it with: sudo apt-get install dataset-fashion-mnist"; exit 1; fi

demo: install fashion-mnist
	$(VENV)/bin/vitlinearizer demo $(ARGS)

bench: install
	$(VENV)/bin/vitlinearizer bench $(ARGS)

# Wheels for benchmarks/gpu.sh on a lent GPU machine, which has its own CUDA torch and triton but no network:
# our pinned timm and the optional fla-core Triton kernels (and einops, which fla needs), for Python 3.12.
# Fetched here, where PyPI is reachable, into .whl/ (git-ignored), which the device call carries.
GPU_WHEELS := timm==1.0.31 fla-core==0.6.0 einops==0.8.2
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) runs
