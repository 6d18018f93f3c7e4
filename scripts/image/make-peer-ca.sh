#!/bin/sh
# The Job `shoal-peer-ca` (deploy/kubernetes/shoal.yaml): makes the cluster's peer CA (an EC
# P-256 key and a 10-year self-signed certificate) and stores it in the Secret shoal-peer-ca
# (ca.pem, ca.key) through the API server, with the pod's service account. An existing Secret
# is kept (nodes' certificates stay valid, and a CA you brought is not replaced); a Secret
# another run created meanwhile (409) is kept too. The key never leaves memory but in the
# request.
set -eu

namespace="${NAMESPACE:-kube-system}"
name="${SECRET_NAME:-shoal-peer-ca}"
sa=/var/run/secrets/kubernetes.io/serviceaccount
api="https://${KUBERNETES_SERVICE_HOST:?not in a pod}:${KUBERNETES_SERVICE_PORT:-443}"
url="$api/api/v1/namespaces/$namespace/secrets"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

request() {
  curl -sS --cacert "$sa/ca.crt" -H "Authorization: Bearer $(cat "$sa/token")" \
    -o "$work/answer" -w '%{http_code}' "$@"
}

code="$(request "$url/$name")"
case "$code" in
  200) echo "shoal-make-peer-ca: the Secret $name exists; kept"; exit 0 ;;
  404) ;;
  *) echo "shoal-make-peer-ca: reading the Secret $name: HTTP $code: $(cat "$work/answer")" >&2; exit 1 ;;
esac
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$work/ca.key" -out "$work/ca.pem" -days 3650 -subj "/CN=shoal peer CA" 2>/dev/null
printf '{"apiVersion":"v1","kind":"Secret","metadata":{"name":"%s","namespace":"%s"},"type":"Opaque","data":{"ca.pem":"%s","ca.key":"%s"}}' \
  "$name" "$namespace" "$(base64 -w0 "$work/ca.pem")" "$(base64 -w0 "$work/ca.key")" >"$work/secret.json"
code="$(request -X POST -H 'Content-Type: application/json' --data "@$work/secret.json" "$url")"
case "$code" in
  201) echo "shoal-make-peer-ca: created the Secret $name" ;;
  409) echo "shoal-make-peer-ca: the Secret $name was created meanwhile; kept" ;;
  *) echo "shoal-make-peer-ca: creating the Secret $name: HTTP $code: $(cat "$work/answer")" >&2; exit 1 ;;
esac
