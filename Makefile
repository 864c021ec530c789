# Stages are file targets: a re-run skips what is already up to date.
# Logic lives in the `pipeline` CLI; this file only chains it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.14.1 torchvision==0.29.1
BUILD  ?= build
PIPE   := $(BIN)/pipeline
FORCE  ?=

.PHONY: setup demo test test-fast cifar10-submit dogs-submit clean
.DELETE_ON_ERROR:

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# ---- the embedded demo: scikit-learn's digits, end to end on CPU ----------
DEMO := $(BUILD)/digits

$(DEMO)/raw/labels.csv: | $(VENV)/.installed
	$(PIPE) download digits $(DEMO)/raw

$(DEMO)/work/reorg.json: $(DEMO)/raw/labels.csv
	$(PIPE) reorg digits $(DEMO)/raw $(DEMO)/work

$(DEMO)/run/holdout/done.json: $(DEMO)/work/reorg.json
	$(PIPE) train digits $(DEMO)/work $(DEMO)/run --device cpu --force

submissions/digits-demo.csv: $(DEMO)/run/holdout/done.json
	$(PIPE) predict digits $(DEMO)/work $(DEMO)/run $@ --force

demo: submissions/digits-demo.csv
	@$(BIN)/python -c "import pandas as p; m = p.read_csv('$(DEMO)/run/holdout/metrics.csv'); print(f'digits: validation accuracy {m.valid_accuracy.max():.4f} (best of {len(m)} epochs)')"
	@echo "submission: $<"

# ---- real competitions: DATA=unzipped download, else the kaggle CLI fetches it
define competition
$(1)_RAW  := $$(if $$(DATA),$$(DATA),$(BUILD)/$(1)/raw)
$(1)_WORK := $(BUILD)/$(1)/work
$(1)_RUN  := $(BUILD)/$(1)/run

$(BUILD)/$(1)/raw/$(2): | $(VENV)/.installed
	$(PIPE) download $(1) $(BUILD)/$(1)/raw

$$($(1)_WORK)/reorg.json: $$($(1)_RAW)/$(2)
	$(PIPE) reorg $(1) $$($(1)_RAW) $$($(1)_WORK)

$$($(1)_RUN)/holdout/done.json: $$($(1)_WORK)/reorg.json
	$(PIPE) train $(1) $$($(1)_WORK) $$($(1)_RUN) $(TRAIN_ARGS) $(FORCE)

submissions/$(1).csv: $$($(1)_RUN)/holdout/done.json
	$(PIPE) predict $(1) $$($(1)_WORK) $$($(1)_RUN) $$@ $(PREDICT_ARGS) $(FORCE)
endef

$(eval $(call competition,cifar-10,trainLabels.csv))
$(eval $(call competition,dog-breed-identification,labels.csv))

cifar10-submit: submissions/cifar-10.csv
dogs-submit: submissions/dog-breed-identification.csv

clean:
	rm -rf $(BUILD)
