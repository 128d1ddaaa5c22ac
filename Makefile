# mulambda developer entry points. `make help` lists them.
# Needs: python >= 3.11; for up/down/e2e also docker, kind, kubectl and helm.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CLUSTER    ?= mulambda
NAMESPACE  ?= mulambda
RELEASE    ?= mulambda
IMAGE_REPO ?= ghcr.io/mulambda/mulambda
IMAGE_TAG  ?= dev
IMAGE      := $(IMAGE_REPO):$(IMAGE_TAG)
MODEL_DIR  ?= examples/models/half_plus_two
MODEL_VERSION ?= 1
MODEL_BUCKET  ?= models
MODEL_URI  ?= s3://$(MODEL_BUCKET)/half_plus_two
S3_PORT    ?= 19000
TIMEOUT    ?= 300s

PYTHON   ?= python
PYTEST   ?= pytest
MULAMBDA ?= mulambda
KIND     ?= kind
KUBECTL  ?= kubectl
HELM     ?= helm
DOCKER   ?= docker

.PHONY: help dev test lint e2e image cluster install models examples wait predict up down uninstall controlplane plots

help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

dev: ## install with test tools, the package symlinked to this checkout (hack/dev_install.py)
	$(PYTHON) -m pip install '.[test]'
	$(PYTHON) hack/dev_install.py

# Plain `pytest`, not `python -m pytest`: the latter puts the repo root on
# sys.path, where operator/ would shadow the standard library.
test: controlplane ## unit + integration tests (a local control plane, no cluster needed)
	$(PYTEST) -m "not e2e"

lint: ## ruff + mypy
	ruff check .
	# From outside the checkout: check the installed package, where operator/ and
	# companion/ live under mulambda (run from here, ./mulambda would shadow it).
	cd / && mypy --config-file $(CURDIR)/pyproject.toml -p mulambda
	# The benchmarks too: they run by hand, so nothing else notices when an API moves.
	cd / && mypy --config-file $(CURDIR)/pyproject.toml $(CURDIR)/bench/*.py

# The README's pictures (mulambda/tools/plots.py; matplotlib from the `plots` or `test` extra).
PLOTS_DIR   ?= docs/img
PLOT_HOURS  ?= 24
PLOT_SUITE  ?= --requests 3000
plots: ## redraw docs/img/*.png: a simulated day of autoscaling (requests, tasks), the routers of the simulation suite
	$(PYTHON) bench/autoscale.py --hours $(PLOT_HOURS) --plot $(PLOTS_DIR)
	$(MULAMBDA) simulate --suite $(PLOT_SUITE) --plot $(PLOTS_DIR)

controlplane: ## build (or reuse) etcd, kube-apiserver & co., kwok, helm from hack/controlplane/go.mod
	bash hack/controlplane/build.sh

e2e: ## end-to-end tests against the cluster KUBECONFIG points to (after `make up`)
	MULAMBDA_E2E_NAMESPACE=$(NAMESPACE) MULAMBDA_E2E_RELEASE=$(RELEASE) $(PYTEST) -m e2e tests/e2e

image: ## build the one mulambda image
	$(DOCKER) build -t $(IMAGE) .

cluster: ## create the kind cluster (kind-config.yaml) unless it exists
	@if $(KIND) get clusters | grep -qx '$(CLUSTER)'; then \
	  echo "kind cluster $(CLUSTER) exists"; \
	else \
	  $(KIND) create cluster --name $(CLUSTER) --config kind-config.yaml; \
	fi

install: ## helm install the chart with the dev MinIO and the local image
	$(KIND) load docker-image $(IMAGE) --name $(CLUSTER)
	$(HELM) upgrade --install $(RELEASE) charts/mulambda \
	  --namespace $(NAMESPACE) --create-namespace \
	  --set image.repository=$(IMAGE_REPO) --set image.tag=$(IMAGE_TAG) \
	  --set image.pullPolicy=IfNotPresent \
	  --set minio.enabled=true \
	  --set selector.service.type=NodePort --set selector.service.nodePort=30080 \
	  --wait --timeout 5m

# The chart's post-install Job created bucket $(MODEL_BUCKET) (minio.buckets).
models: ## push $(MODEL_DIR) to the in-cluster MinIO through a port-forward
	@test -f $(MODEL_DIR)/$(MODEL_VERSION)/saved_model.pb || { echo "no SavedModel in $(MODEL_DIR)/$(MODEL_VERSION)"; exit 1; }
	@$(KUBECTL) -n $(NAMESPACE) port-forward svc/$(RELEASE)-minio $(S3_PORT):9000 >/dev/null & pf=$$!; \
	trap "kill $$pf" EXIT; \
	for _ in $$(seq 30); do curl -fs http://127.0.0.1:$(S3_PORT)/minio/health/live && break; sleep 1; done; \
	secret=$$($(KUBECTL) -n $(NAMESPACE) get configmap $(RELEASE)-config -o jsonpath='{.data.MULAMBDA_S3_SECRET}'); \
	export MULAMBDA_S3_ENDPOINT=127.0.0.1:$(S3_PORT) MULAMBDA_S3_SECURE=false; \
	export MULAMBDA_S3_ACCESS_KEY=$$($(KUBECTL) -n $(NAMESPACE) get secret $$secret -o jsonpath='{.data.accessKey}' | base64 -d); \
	export MULAMBDA_S3_SECRET_KEY=$$($(KUBECTL) -n $(NAMESPACE) get secret $$secret -o jsonpath='{.data.secretKey}' | base64 -d); \
	$(MULAMBDA) models push $(MODEL_DIR)/$(MODEL_VERSION) $(MODEL_URI) --version $(MODEL_VERSION) --force

examples: ## apply the example ModelExecutor and Client
	$(KUBECTL) -n $(NAMESPACE) apply -f examples/modelexecutor.yaml -f examples/client.yaml

wait: ## wait until the example executor is Ready
	$(KUBECTL) -n $(NAMESPACE) wait --for=condition=Ready modelexecutor/half-plus-two --timeout=$(TIMEOUT)

SELECTOR_URL ?= http://127.0.0.1:8080

predict: ## one REST prediction in-cluster via the executor's status endpoint; ask the selector
	@endpoint=$$($(KUBECTL) -n $(NAMESPACE) get modelexecutor half-plus-two -o jsonpath='{.status.endpoint.rest}'); \
	echo "POST $$endpoint/v1/models/half_plus_two:predict {\"instances\": [1.0, 2.0, 5.0]}"; \
	$(KUBECTL) -n $(NAMESPACE) run mulambda-predict --rm -i --quiet --restart=Never \
	  --image=curlimages/curl:8.11.1 -- \
	  curl -fsS -X POST -d '{"instances": [1.0, 2.0, 5.0]}' "$$endpoint/v1/models/half_plus_two:predict"
	@echo
	@echo "POST $(SELECTOR_URL)/select/$(NAMESPACE)/demo (selector NodePort, kind-config.yaml; as a ServiceAccount allowed to select)"
	@$(KUBECTL) -n $(NAMESPACE) create serviceaccount demo-caller --dry-run=client -o yaml | $(KUBECTL) apply -f - >/dev/null
	@$(KUBECTL) -n $(NAMESPACE) create rolebinding demo-caller --clusterrole=$(RELEASE)-client-caller \
	  --serviceaccount=$(NAMESPACE):demo-caller --dry-run=client -o yaml | $(KUBECTL) apply -f - >/dev/null
	@curl -fsS -X POST -H "Authorization: Bearer $$($(KUBECTL) -n $(NAMESPACE) create token demo-caller)" \
	  $(SELECTOR_URL)/select/$(NAMESPACE)/demo || echo "(selector not reachable on $(SELECTOR_URL))"
	@echo
	@$(KUBECTL) -n $(NAMESPACE) get modelexecutors,clients

up: cluster image install models examples wait predict ## kind cluster + image + chart + model + examples, then one prediction

down: ## delete the kind cluster
	$(KIND) delete cluster --name $(CLUSTER)

uninstall: ## remove the example resources, the release and the CRDs (Helm keeps CRDs)
	-$(KUBECTL) -n $(NAMESPACE) delete -f examples/modelexecutor.yaml -f examples/client.yaml --ignore-not-found --wait
	-$(HELM) uninstall $(RELEASE) --namespace $(NAMESPACE)
	$(KUBECTL) delete crd modelexecutors.mulambda.io clients.mulambda.io --ignore-not-found
