# lineray: one-command setup, demo and tests. Everything installs into ./.venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo sample test bench image clean

# torch first, pinned: on this CPU machine 2.13.0 comes from local disk in seconds, while an
# unpinned torch (or a package that pulls it first) downloads a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# A real batch job on the embedded default: private local Ray, the bundled digits model,
# the bundled sample prompts -> a Parquet image dataset + PNGs + a contact sheet in out/demo.
demo: setup
	$(BIN)/lineray generate configs/jobs/digits.yaml --output out/demo
	$(BIN)/lineray export out/demo --out out/demo/png

# Ten digits in this process, no Ray: out/samples/*.png and out/samples/contact_sheet.png.
sample: setup
	$(BIN)/lineray sample --out out/samples

test: setup
	$(BIN)/python -m pytest -q

# The numbers in the README's Benchmarks section (~25 min on 2 cores; run on a quiet machine).
bench: setup
	$(BIN)/python benchmarks/decode_throughput.py --suite reference --grids 24 --batches 4 --dtypes float32
	$(BIN)/python benchmarks/decode_throughput.py --suite cache --grids 24 --batches 4 --dtypes float32
	$(BIN)/python benchmarks/max_batch.py --verify
	$(BIN)/python benchmarks/max_batch.py --measure --kv-cap-gib 0.5 --dtype float32 --presets GPT-B \
		--csv benchmarks/results/max_batch_0.5gib_fp32.csv

# The KubeRay image (Dockerfile; configs/kuberay/*.yaml name this tag). Needs Docker and a GPU base image pull.
IMAGE ?= ghcr.io/example/lineray:0.1.0-ray2.60.0-gpu
image:
	docker build -t $(IMAGE) .

clean:
	rm -rf $(VENV) out outputs .pytest_cache
