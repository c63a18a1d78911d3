#!/usr/bin/env bash
# Make the throwaway certificates and keys that docker/compose.yml mounts at /app/certs.
#
#   docker/make-certs.sh [--nodes N] [--out DIR]     (defaults: N=2, DIR=docker/certs)
#
# What it writes (DIR is wiped of these names first; nothing else in DIR is touched):
#   ca.crt, ca.key                    a throwaway certificate authority (openssl, EC P-384)
#   superlink.crt, superlink.key      the SuperLink's server certificate, signed by the CA (openssl);
#                                     SANs: DNS:superlink (the compose service), DNS:localhost,
#                                     IP:127.0.0.1 (the flwr CLI on the host reaches the published port)
#   supernode-<i>.crt/.key            each SuperNode's Runtime API server certificate (openssl), so its
#                                     SuperExec connects with TLS too; SANs: DNS:supernode-<i>,
#                                     DNS:localhost, IP:127.0.0.1
#   supernode-<i>-auth, -auth.pub     each SuperNode's authentication key pair (ssh-keygen): ECDSA
#                                     P-384 in OpenSSH format, the format flower-supernode's
#                                     --auth-supernode-private-key loads and `flwr supernode register`
#                                     takes
# for i = 1..N. The CA key is kept only so more certificates can be signed; it is not mounted
# anywhere that needs it. Everything here is for a test deployment: use a real CA in production.
set -euo pipefail

nodes=2
out="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/certs"
days=365

usage() { echo "usage: $0 [--nodes N] [--out DIR]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) [ $# -ge 2 ] || usage; nodes="$2"; shift 2 ;;
    --out) [ $# -ge 2 ] || usage; out="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "error: unknown argument '$1'; use --nodes N and --out DIR" >&2; exit 2 ;;
  esac
done
if ! [[ "$nodes" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --nodes must be a positive integer, got '$nodes'" >&2
  exit 2
fi
for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found; install openssl and openssh-client" >&2; exit 2; }
done

mkdir -p "$out"
cd "$out"
umask 077  # private keys readable by their owner only

# A server certificate for <name>, signed by the CA, with SANs for the compose service name and
# for localhost/127.0.0.1 (openssl).
server_cert() {
  local name="$1" ext
  ext="$(mktemp)"
  printf '%s\n' \
    "basicConstraints = critical, CA:FALSE" \
    "keyUsage = critical, digitalSignature, keyEncipherment" \
    "extendedKeyUsage = serverAuth" \
    "subjectAltName = DNS:${name}, DNS:localhost, IP:127.0.0.1" > "$ext"
  openssl ecparam -name secp384r1 -genkey -noout -out "${name}.key"
  openssl req -new -key "${name}.key" -subj "/O=fedsim/CN=${name}" -out "${name}.csr"
  openssl x509 -req -in "${name}.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
    -days "$days" -sha384 -extfile "$ext" -out "${name}.crt" 2>/dev/null
  rm -f "${name}.csr" "$ext"
}

rm -f ca.crt ca.key ca.srl superlink.crt superlink.key supernode-*.crt supernode-*.key \
  supernode-*-auth supernode-*-auth.pub

# The CA (openssl): self-signed, EC P-384.
openssl ecparam -name secp384r1 -genkey -noout -out ca.key
openssl req -x509 -new -key ca.key -sha384 -days "$days" -subj "/O=fedsim/CN=fedsim test CA" \
  -addext "basicConstraints = critical, CA:TRUE" -addext "keyUsage = critical, keyCertSign, cRLSign" \
  -out ca.crt

server_cert superlink
for i in $(seq 1 "$nodes"); do
  server_cert "supernode-${i}"
  # The SuperNode's authentication key pair (ssh-keygen): ECDSA in OpenSSH format, no passphrase.
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedsim supernode-${i}" -f "supernode-${i}-auth"
done
rm -f ca.srl

# Certificates and public keys are public; the flwr CLI on the host reads ca.crt.
chmod 644 ca.crt superlink.crt supernode-*.crt supernode-*-auth.pub
echo "wrote the CA, the SuperLink certificate and ${nodes} SuperNode certificate(s) + key pair(s) to ${out}"
