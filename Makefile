# Set-up and everyday commands. `make demo` and `make test` each install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on these machines; a GPU user picks their own, e.g. TORCH_SPEC="torch==2.5.1".
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: install demo chat-demo rlhf-demo test bench clean

install: $(STAMP)

# Re-runs only when the package metadata changes, so a second `make install` is instant.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: install
	$(PY) -m gptlab demo --out $(DEMO_DIR)

# fine-tunes the demo's model (pretraining it first when runs/demo has none) into a chat model
chat-demo: install
	$(PY) -m gptlab demo --chat --out $(DEMO_DIR)

# a reward model, PPO, DPO and GRPO on the chat demo's model (made first when runs/demo has none)
rlhf-demo: install
	$(PY) -m gptlab demo --rlhf --out $(DEMO_DIR)

test: install
	$(PY) -m pytest -q tests

# the peers compared against (TRL for fine-tuning) come from the bench extra, never the core install
bench: install
	$(PY) -m pip install -q --disable-pip-version-check -e ".[bench]"
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/tokenizer_speed.py
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/finetune.py

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info
