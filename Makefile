# mmssl: `make demo` (pretrain + probe on the embedded speech data) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= runs/demo
# 2 cores: the trainer uses them all; loader workers decode audio beside it
export OMP_NUM_THREADS ?= 2

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/mmssl pretrain modality=speech objective=hubert run_dir=$(DEMO)
	$(BIN)/mmssl eval linear-probe encoder=$(DEMO) out=$(DEMO)/eval
	@$(BIN)/python -c "import json; r = json.load(open('$(DEMO)/eval/linear_probe.json')); \
	print(f\"\\nHuBERT pretraining, speech, {r['n_test']} test items, {r['num_classes']} words: \" \
	      f\"trained {r['accuracy']:.3f} vs random init {r['random_init_accuracy']:.3f} \" \
	      f\"(classical MFCC features {r['features_baseline_accuracy']:.3f})\")"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check mmssl modalities eval tests bench

clean:
	rm -rf $(VENV) runs
