# The two commands of the README:
#   make demo   set up .venv if needed, then train the embedded tiny default on CPU (with evaluation)
#   make test   set up .venv if needed, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# DeepSpeed builds its C++ ops on first use; keep them in one cache for all runs and tests.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
RUN_DIR ?= runs/tiny_sherlock-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup demo test clean-cache

setup:
	@scripts/setup_env.sh

demo: setup
	$(VENV)/bin/deepspeed --num_gpus 1 engine/train.py --recipe recipes/tiny_sherlock.yaml \
		--options run.output_dir=$(RUN_DIR)
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir $(RUN_DIR)/tb"

test: setup
	$(PY) -m pytest tests -q

clean-cache:
	rm -rf .cache
