# Static checks of the Dockerfile, the Helm chart and the monitoring config.
# Included by the top-level Makefile; run from the repository root:
#
#   make deploy-check
#
# Everything runs offline once deploy/tools/install.sh has put the tools in
# .tools/ (the first run downloads them; later runs take about a second).
# tests/deploy runs the same checks under pytest.

DEPLOY_TOOLS   := $(CURDIR)/.tools
DEPLOY_RENDER  := $(DEPLOY_TOOLS)/render
DEPLOY_HELM    := $(DEPLOY_TOOLS)/bin/helm
DEPLOY_LINTBIN := $(DEPLOY_TOOLS)/venv-lint/bin
DEPLOY_CHECKOV := $(DEPLOY_TOOLS)/venv-checkov/bin/checkov
DEPLOY_CHART   := helm/kiln
DEPLOY_KUBE    := 1.33.0
# Renders assume the Prometheus Operator CRDs are installed, so the
# ServiceMonitor and PrometheusRule are rendered and checked too.
DEPLOY_APIS    := --api-versions monitoring.coreos.com/v1/ServiceMonitor \
                  --api-versions monitoring.coreos.com/v1/PrometheusRule
DEPLOY_ENV     := PATH="$(DEPLOY_TOOLS)/bin:$$PATH" \
                  HELM_CACHE_HOME="$(DEPLOY_TOOLS)/h/cache" \
                  HELM_CONFIG_HOME="$(DEPLOY_TOOLS)/h/cfg" \
                  HELM_DATA_HOME="$(DEPLOY_TOOLS)/h/data"
# promtool is optional (Debian's prometheus package); its checks are skipped without it.
DEPLOY_PROMTOOL = $(firstword $(wildcard $(DEPLOY_TOOLS)/bin/promtool) $(shell command -v promtool 2>/dev/null))

.PHONY: deploy-check deploy-tools deploy-helm deploy-validate deploy-checkov \
        deploy-hadolint deploy-yamllint deploy-promtool

deploy-check: deploy-tools
	@$(MAKE) --no-print-directory deploy-helm deploy-validate deploy-checkov \
	  deploy-hadolint deploy-yamllint deploy-promtool
	@echo "deploy-check: all checks passed"

deploy-tools:
	@deploy/tools/install.sh

# helm lint --strict with the default values and each CI values file, then the
# GPU and CPU renders that the other checks read.
deploy-helm: deploy-tools
	$(DEPLOY_ENV) $(DEPLOY_HELM) lint --strict $(DEPLOY_CHART)
	$(DEPLOY_ENV) $(DEPLOY_HELM) lint --strict $(DEPLOY_CHART) -f $(DEPLOY_CHART)/ci/gpu-values.yaml
	$(DEPLOY_ENV) $(DEPLOY_HELM) lint --strict $(DEPLOY_CHART) -f $(DEPLOY_CHART)/ci/cpu-values.yaml
	@mkdir -p $(DEPLOY_RENDER)
	$(DEPLOY_ENV) $(DEPLOY_HELM) template kiln $(DEPLOY_CHART) -n kiln -f $(DEPLOY_CHART)/ci/gpu-values.yaml \
	  --kube-version $(DEPLOY_KUBE) $(DEPLOY_APIS) > $(DEPLOY_RENDER)/gpu.yaml
	$(DEPLOY_ENV) $(DEPLOY_HELM) template kiln $(DEPLOY_CHART) -n kiln -f $(DEPLOY_CHART)/ci/cpu-values.yaml \
	  --kube-version $(DEPLOY_KUBE) $(DEPLOY_APIS) > $(DEPLOY_RENDER)/cpu.yaml

# Schema validation of every rendered object; unknown or removed APIs fail.
deploy-validate: deploy-helm
	$(DEPLOY_LINTBIN)/python deploy/tools/validate_manifests.py $(DEPLOY_KUBE) $(DEPLOY_RENDER)/gpu.yaml
	$(DEPLOY_LINTBIN)/python deploy/tools/validate_manifests.py $(DEPLOY_KUBE) $(DEPLOY_RENDER)/cpu.yaml

# checkov: the renders and the Dockerfile with no skipped check; the chart as
# checkov renders it (default values, namespace "default") skips the two checks
# that only an install decides: CKV_K8S_21 (the namespace comes from -n) and
# CKV_K8S_43 (the digest is set with image.digest at release time).
deploy-checkov: deploy-helm
	$(DEPLOY_ENV) $(DEPLOY_CHECKOV) --quiet --compact --skip-download \
	  --framework kubernetes dockerfile \
	  -f $(DEPLOY_RENDER)/gpu.yaml -f $(DEPLOY_RENDER)/cpu.yaml -f Dockerfile
	$(DEPLOY_ENV) $(DEPLOY_CHECKOV) --quiet --compact --skip-download \
	  --framework helm -d $(DEPLOY_CHART) --skip-check CKV_K8S_21,CKV_K8S_43

deploy-hadolint: deploy-tools
	$(DEPLOY_LINTBIN)/hadolint Dockerfile

deploy-yamllint: deploy-tools
	$(DEPLOY_LINTBIN)/yamllint --strict -c .yamllint.yaml helm deploy .yamllint.yaml

deploy-promtool: deploy-tools
ifeq ($(DEPLOY_PROMTOOL),)
	@echo "deploy-promtool: SKIPPED: promtool not found (deploy/tools/install.sh installs it as root from Debian's prometheus package)"
else
	$(DEPLOY_PROMTOOL) check rules deploy/prometheus/rules/kiln-alerts.yaml
	$(DEPLOY_PROMTOOL) test rules deploy/prometheus/tests/kiln-alerts.test.yaml
	$(DEPLOY_PROMTOOL) check config deploy/prometheus/prometheus.yml
endif
