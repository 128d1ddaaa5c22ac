#!/usr/bin/env bash
# Builds the test control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok, helm) from the modules pinned in go.mod, into a
# cache outside the checkout:
#
#   ${MULAMBDA_CONTROLPLANE_DIR:-$HOME/.cache/mulambda/controlplane}/<key>/bin
#
# where <key> hashes go.mod, go.sum and this script. A complete cache entry is
# reused. Beside bin/, share/kwok-stages.yaml holds KWOK's default Stages
# (what kwokctl configures: node-initialize, node-heartbeat-with-lease,
# pod-ready, pod-complete, pod-delete), taken from the pinned kwok module, for
# running the kwok binary standalone. A build goes to a temporary directory
# renamed into place at the end, so an interrupted build never leaves a
# partial entry.
#
#   build.sh              build (or reuse), print the versions, then the bin dir
#   build.sh --print-dir  print the bin dir if it is complete; exit 1 otherwise
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=${MULAMBDA_CONTROLPLANE_DIR:-$HOME/.cache/mulambda/controlplane}
key=$(cat "$here/go.mod" "$here/go.sum" "$here/build.sh" | sha256sum | cut -c1-12)
dir=$root/$key
bins=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm)

complete() {
  local b
  for b in "${bins[@]}"; do [[ -x $1/bin/$b ]] || return 1; done
  [[ -s $1/share/kwok-stages.yaml ]]
}

case ${1:-} in
  --print-dir)
    if complete "$dir"; then echo "$dir/bin"; exit 0; fi
    echo "control plane binaries missing in $dir: run \`make controlplane\`" >&2
    exit 1 ;;
  "") ;;
  *) echo "usage: $0 [--print-dir]" >&2; exit 2 ;;
esac

if complete "$dir"; then
  echo "reusing $dir/bin"
else
  command -v go >/dev/null || { echo "go is not installed (Go >= 1.26 is needed)" >&2; exit 1; }
  cd "$here"
  mkdir -p "$root"
  tmp=$(mktemp -d "$root/.build-$key.XXXXXX")
  chmod 755 "$tmp"
  trap 'rm -rf "$tmp"' EXIT

  # Stamp the versions the way each project's release build does; without it
  # /version says v0.0.0 and Helm's kubeVersion checks fail.
  modver() { go list -m -f '{{.Version}}' "$1"; }
  k8s=$(modver k8s.io/kubernetes)                  # v1.36.3
  k8s_date=$(go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)
  k8s_major=${k8s#v}; k8s_major=${k8s_major%%.*}
  k8s_minor=${k8s#v*.}; k8s_minor=${k8s_minor%%.*}
  clientgo=$(go list -m -f '{{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}' k8s.io/client-go)  # v0.36.3
  clientgo_minor=${clientgo#v0.}; clientgo_minor=${clientgo_minor%%.*}
  helm=$(modver helm.sh/helm/v3)
  kwok=$(modver sigs.k8s.io/kwok)
  etcd=$(modver go.etcd.io/etcd/server/v3)

  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$k8s -X $pkg.gitMajor=$k8s_major -X $pkg.gitMinor=$k8s_minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$k8s_date"
  done
  ldflags+=" -X helm.sh/helm/v3/internal/version.version=$helm"
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$clientgo_minor"
  done
  ldflags+=" -X sigs.k8s.io/kwok/pkg/consts.Version=${kwok#v} -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=${k8s#v}"
  ldflags+=" -X go.etcd.io/etcd/api/v3/version.GitSHA=$etcd"

  echo "building $k8s, etcd $etcd, kwok $kwok, helm $helm into $dir (minutes on a cold cache)"
  start=$SECONDS
  # `go build -o DIR` names each binary after its package (etcd's is "server").
  CGO_ENABLED=0 nice -n 10 go build -trimpath -ldflags "$ldflags" -o "$tmp/bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl \
    sigs.k8s.io/kwok/cmd/kwok \
    helm.sh/helm/v3/cmd/helm \
    go.etcd.io/etcd/server/v3
  mv "$tmp/bin/server" "$tmp/bin/etcd"

  stages=$(go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)/kustomize/stage
  mkdir -p "$tmp/share"
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    echo "---"; echo "# sigs.k8s.io/kwok@$kwok kustomize/stage/$f"; cat "$stages/$f"
  done > "$tmp/share/kwok-stages.yaml"
  complete "$tmp" || { echo "build produced an incomplete set: $(ls "$tmp/bin")" >&2; exit 1; }
  echo "built in $((SECONDS - start))s"

  # Rename into place; a concurrent build may have won the race, which is fine.
  if [[ -e $dir ]] && ! complete "$dir"; then rm -rf "$dir"; fi
  mv -T "$tmp" "$dir" 2>/dev/null || complete "$dir"
fi

bin=$dir/bin
"$bin/etcd" --version | sed -n 1p
"$bin/kube-apiserver" --version
"$bin/kube-controller-manager" --version
"$bin/kube-scheduler" --version
echo "kubectl $("$bin/kubectl" version --client -o yaml | awk '/gitVersion/ {print $2}')"
"$bin/kwok" --version 2>&1 | sed -n 1p
echo "helm $("$bin/helm" version --short)"
echo "$bin"
