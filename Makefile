# mmssl: `make demo` (pretrain + probe on the embedded speech data) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= runs/demo
# 2 cores: the trainer uses them all; loader workers decode audio beside it
export OMP_NUM_THREADS ?= 2

.PHONY: install demo test lint clean bench-gpu bench-smoke test-interop

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO)
	# batch 32 with the unmasked-frame loss: half the bare command's time, a higher probe (results/hubert.md)
	$(BIN)/mmssl pretrain modality=speech objective=hubert trainer.batch_size=32 objective.unmasked_weight=1 run_dir=$(DEMO)
	$(BIN)/mmssl eval linear-probe encoder=$(DEMO) out=$(DEMO)/eval
	@$(BIN)/python -c "import json; r = json.load(open('$(DEMO)/eval/linear_probe.json')); \
	print(f\"\\nHuBERT pretraining, speech, {r['n_test']} test items, {r['num_classes']} words: \" \
	      f\"trained {r['accuracy']:.3f} vs random init {r['random_init_accuracy']:.3f} \" \
	      f\"(classical MFCC features {r['features_baseline_accuracy']:.3f})\")"

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The opt-in interop suite (tests/interop): real fairseq (fairseq-fixed, an sdist that compiles its
# C++ parts against torch: about 6 CPU-minutes) and transformers as oracles, in their own venv.
IVENV  := .venv-interop
IBIN   := $(IVENV)/bin
ISTAMP := $(IVENV)/.installed
$(ISTAMP): pyproject.toml
	test -x $(IBIN)/python || $(PYTHON) -m venv $(IVENV)
	$(IBIN)/python -m pip install -q --upgrade pip setuptools cython
	$(IBIN)/python -m pip install -q torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
	$(IBIN)/python -m pip install -q --no-build-isolation fairseq-fixed==0.12.3.1
	$(IBIN)/python -m pip install -q transformers==5.25.0 -e '.[dev]'
	cd /tmp && $(CURDIR)/$(IBIN)/python -c "import mmssl.modalities.speech.adapter, fairseq, transformers"
	touch $(ISTAMP)

test-interop: $(ISTAMP)
	$(IBIN)/python -m pytest -q -s -p no:warnings tests/interop

# Every benchmark with its reference, one call: on a GPU machine without a package registry, put the
# missing wheels (open_clip, webdataset, hydra, soundfile, nibabel, ...) in $(WHEELS); they install into
# a temporary folder, nothing is installed system-wide. Results: $(BENCH_OUT)/summary.md and *.json.
WHEELS    ?= .whl
BENCH_OUT ?= bench/out
bench-gpu:
	S=$$(mktemp -d) && if ls $(WHEELS)/*.whl >/dev/null 2>&1; then \
	  python3 -m pip install -q --no-index --no-deps --no-compile --target $$S $(WHEELS)/*.whl; fi && \
	PYTHONPATH=$$S:$$PWD python3 bench/run_all.py --device cuda --out $(BENCH_OUT) $(BENCH_ARGS)

bench-smoke: $(STAMP)
	$(BIN)/python bench/run_all.py --device cpu --smoke --out runs/bench-smoke

lint: $(STAMP)
	$(BIN)/ruff check mmssl modalities eval tests bench

clean:
	rm -rf $(VENV) runs
