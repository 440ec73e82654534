# Two commands do everything on a fresh Linux machine with Python 3.11:
#   make demo   set up, then run the main job on the embedded phantom data
#   make test   set up, then run the whole test suite (what CI runs)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out
# No GPU: the CPU build of torch (~200 MB) instead of a multi-GB CUDA build, and onnxruntime instead of -gpu.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(HAS_GPU),yes)
ORT     := gpu
TORCH_INSTALL := $(BIN)/pip install -q torch==2.13.0
else
ORT     := cpu
# The CPU build (+cpu) from pip's configured indexes or PyTorch's CPU index; failing both (offline), plain 2.13.0
# from the configured indexes, which on CI is a local CPU build. Installed first, so `.[train]` adds no other torch.
TORCH_INSTALL := $(BIN)/pip install -q torch==2.13.0+cpu 2>/dev/null \
	|| $(BIN)/pip install -q torch==2.13.0+cpu --extra-index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
	|| $(BIN)/pip install -q torch==2.13.0
endif

PORT   ?= 3000
.PHONY: setup demo serve test check lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(TORCH_INSTALL)
	# The torch just installed is pinned: left free, pip's resolver swaps the +cpu build for a newer CUDA one.
	$(BIN)/pip install -q -e ".[$(ORT),train,dev]" \
	    "torch==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("torch"))')"
	touch $@

# The main job: write the embedded phantom data, generate EM + label pairs with the default model, score the default
# segmentation model on a crop, then start `bentoml serve` over models/, ask it for pairs over HTTP, and stop it.
# Default models (models/README.md records how each was made): phantom-pairs, phantom-from-labels, phantom-seg.
demo: setup
	$(BIN)/emserve data phantom $(OUT)/phantom --overwrite
	rm -rf $(OUT)/generated.zarr
	$(BIN)/emserve generate pairs models/phantom-pairs $(OUT)/generated.zarr --samples 16 --dataset phantom_a
	$(BIN)/emserve data info $(OUT)/generated.zarr
	$(BIN)/emserve evaluate seg models/phantom-seg $(OUT)/phantom/phantom_b.zarr --crops crop4
	BENTOML_DO_NOT_TRACK=true $(BIN)/bentoml serve emserve.serving.service:EMServe --host 127.0.0.1 --port $(PORT) & \
	pid=$$!; trap "kill $$pid" EXIT; \
	for i in $$(seq 120); do curl -sf http://127.0.0.1:$(PORT)/readyz >/dev/null && break; sleep 1; done; \
	curl -sf -X POST http://127.0.0.1:$(PORT)/generate_pairs -H 'content-type: application/json' \
	    -d '{"samples": 4, "present": ["mito_mem", "mito_lum"], "guidance": 3}' -o $(OUT)/served-pairs.npz \
	&& echo "bentoml serve answered generate_pairs: $(OUT)/served-pairs.npz (run it yourself: make serve)"

# The service on its own (docs/SERVICE.md): generate_pairs, generate_from_labels, segment over models/.
serve: setup
	BENTOML_DO_NOT_TRACK=true $(BIN)/bentoml serve emserve.serving.service:EMServe --host 127.0.0.1 --port $(PORT)

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest -q

# The fast tier for development: everything but the tests marked slow (real servers, exports, training runs).
check: lint
	$(BIN)/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) $(OUT)
