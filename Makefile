# Stages are file targets that depend on the files they read, so a re-run redoes
# exactly what changed: new data, other options (TRAIN_ARGS, PREDICT_ARGS and
# REORG_ARGS are recorded in files of their own), a new run. FORCE=1 redoes every
# stage of the goal. Logic lives in the `pipeline` CLI; this file only chains it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.14.1 torchvision==0.29.1
BUILD  ?= build
PIPE   := $(BIN)/pipeline
FORCE  ?=
ALWAYS := $(if $(FORCE),.always)
FORCE_FLAG := $(if $(FORCE),--force)

.PHONY: setup browser demo test test-fast cifar10-submit dogs-submit clean .always
.DELETE_ON_ERROR:

setup: $(VENV)/.installed

# everything the targets below use: the package, its tests and the kaggle CLI; --no-compile: Python
# compiles the modules a command imports on first use, not all of torch's at install time (CI's budget)
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile $(TORCH) -e '.[test,kaggle]'
	touch $@

# both cores (pytest-xdist): tests sharing a module fixture on one worker (tests/conftest.py groups them),
# the others wherever a worker is free; the 15 slowest tests are listed at the end
PYTEST := $(BIN)/python -m pytest -q -n $(or $(JOBS),2) --dist loadgroup --durations=15

# the browser for tests/test_report_browser.py (headless Chromium, driven by selenium from the test
# extra): installed from Debian's packages where apt-get can (root); elsewhere nothing happens and the
# test says why it skips
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update && apt-get install -y chromium chromium-driver) || true

test: setup browser
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

# $(call options,FILE,VALUE): FILE holds VALUE and changes only when VALUE does,
# so a stage that depends on FILE reruns exactly when its options change.
define options
@mkdir -p $(dir $(1))
@printf '%s\n' '$(2)' | cmp -s - $(1) || printf '%s\n' '$(2)' > $(1)
endef

# ---- the embedded demo: scikit-learn's digits, end to end on CPU ----------
DEMO := $(BUILD)/digits

$(DEMO)/raw/labels.csv: competitions/digits.py $(ALWAYS) | $(VENV)/.installed
	$(PIPE) download digits $(DEMO)/raw

$(DEMO)/work/reorg.json: $(DEMO)/raw/labels.csv $(ALWAYS)
	$(PIPE) reorg digits $(DEMO)/raw $(DEMO)/work $(FORCE_FLAG)

$(DEMO)/run/done.json: $(DEMO)/work/reorg.json $(ALWAYS)
	$(PIPE) train digits $(DEMO)/work $(DEMO)/run --device cpu --force

submissions/digits-demo.csv: $(DEMO)/run/done.json $(ALWAYS)
	$(PIPE) predict digits $(DEMO)/work $(DEMO)/run $@ --force

demo: submissions/digits-demo.csv
	@$(BIN)/python -c "import json; k = json.load(open('$(DEMO)/run/holdout/done.json'))['kept']; print(f'digits: validation accuracy {k[\"metric\"]:.4f} of the submitted model (epoch {k[\"epoch\"]}, 95% interval {k[\"interval\"][0]:.4f}-{k[\"interval\"][1]:.4f}, {k[\"valid_images\"]} images)')"
	@echo "submission: $<"

# ---- real competitions: DATA=unzipped download, else the kaggle CLI fetches it
# $(call competition,SLUG,LABELS_FILE,SAMPLE_FILE). A finished run is retrained
# only with FORCE=1 (training is costly: make stops with train's error instead);
# a submission is rewritten whenever its run or options changed.
define competition
$(1)_RAW  := $$(if $$(DATA),$$(DATA),$(BUILD)/$(1)/raw)
$(1)_WORK := $(BUILD)/$(1)/work
$(1)_RUN  := $(BUILD)/$(1)/run

$(BUILD)/$(1)/raw/$(2): $(ALWAYS) | $(VENV)/.installed
	$(PIPE) download $(1) $(BUILD)/$(1)/raw

$(BUILD)/$(1)/raw/$(3): $(BUILD)/$(1)/raw/$(2) ;

$(BUILD)/$(1)/reorg.args: .always
	$$(call options,$$@,$(REORG_ARGS))

$(BUILD)/$(1)/train.args: .always
	$$(call options,$$@,$(TRAIN_ARGS))

$(BUILD)/$(1)/predict.args: .always
	$$(call options,$$@,$(PREDICT_ARGS))

$$($(1)_WORK)/reorg.json: $$($(1)_RAW)/$(2) $$($(1)_RAW)/$(3) $(BUILD)/$(1)/reorg.args $(ALWAYS)
	$(PIPE) reorg $(1) $$($(1)_RAW) $$($(1)_WORK) $(REORG_ARGS) $(FORCE_FLAG)

$$($(1)_RUN)/done.json: $$($(1)_WORK)/reorg.json $(BUILD)/$(1)/train.args $(ALWAYS)
	$(PIPE) train $(1) $$($(1)_WORK) $$($(1)_RUN) $(TRAIN_ARGS) $(FORCE_FLAG)

submissions/$(1).csv: $$($(1)_RUN)/done.json $$($(1)_WORK)/reorg.json $(BUILD)/$(1)/predict.args $(ALWAYS)
	$(PIPE) predict $(1) $$($(1)_WORK) $$($(1)_RUN) $$@ $(PREDICT_ARGS) --force
endef

$(eval $(call competition,cifar-10,trainLabels.csv,sampleSubmission.csv))
$(eval $(call competition,dog-breed-identification,labels.csv,sample_submission.csv))

cifar10-submit: submissions/cifar-10.csv
dogs-submit: submissions/dog-breed-identification.csv

clean:
	rm -rf $(BUILD)
