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
TORCH   := torch==2.13.0
ORT     := gpu
else
TORCH   := torch==2.13.0+cpu
ORT     := cpu
endif

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel comes from pip's configured indexes when they carry it, else from PyTorch's CPU index.
	$(BIN)/pip install -q $(TORCH) || $(BIN)/pip install -q $(TORCH) --extra-index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install -q -e ".[$(ORT),train,dev]"
	touch $@

# The main job: write the embedded phantom data, then generate EM + label pairs with the default model
# (models/phantom-pairs, trained on that data by the commands in models/README.md).
demo: setup
	$(BIN)/emserve data phantom $(OUT)/phantom --overwrite
	rm -rf $(OUT)/generated.zarr
	$(BIN)/emserve generate pairs models/phantom-pairs $(OUT)/generated.zarr --samples 16 --dataset phantom_a
	$(BIN)/emserve data info $(OUT)/generated.zarr

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) $(OUT)
