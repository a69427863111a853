#!/bin/sh
# TLS material for the Lipari broker (openssl; EC P-256 keys, SHA-256 signatures).
#
#   conf/mosquitto/make-certs.sh ca      [DIR]                  CA: DIR/ca.crt, DIR/ca.key
#   conf/mosquitto/make-certs.sh server  [DIR] NAME...          broker: DIR/server.crt, .key
#   conf/mosquitto/make-certs.sh meter   [DIR] ID [PASSWD] [KEYS]  one meter's credentials
#
# DIR defaults to /etc/mosquitto/lipari (the paths in mosquitto.conf). NAME is a DNS name
# or an IP address the meters use to reach the broker (put every one in the certificate:
# a meter verifies the name). `ca` keeps an existing CA (re-issuing it would lock out every
# meter that trusts it); `server` re-issues the broker certificate from that CA.
# `meter` runs add-meter.sh (MQTT password + command key) and issues a client certificate
# (CN = meter id) for meters whose modem presents one; the meter needs DIR/ca.crt to verify
# the broker. `lipari system` calls `ca` and `server 127.0.0.1 localhost` into var/tls.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cmd="${1:-}"; [ $# -gt 0 ] && shift
dir="${1:-/etc/mosquitto/lipari}"; [ $# -gt 0 ] && shift
days_ca=3650
days=825
command -v openssl >/dev/null || { echo "make-certs.sh: openssl is not installed" >&2; exit 2; }
mkdir -p "$dir"
umask 077

need_ca() {
  [ -f "$dir/ca.crt" ] && [ -f "$dir/ca.key" ] || {
    echo "make-certs.sh: no CA in $dir; run: $0 ca $dir" >&2; exit 2; }
}

case "$cmd" in
ca)
  if [ -f "$dir/ca.crt" ] && [ -f "$dir/ca.key" ]; then
    echo "CA kept: $dir/ca.crt"; exit 0
  fi
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -days $days_ca -subj "/CN=Lipari broker CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
  chmod 644 "$dir/ca.crt"
  echo "CA: $dir/ca.crt (give it to every meter and head-end client; keep ca.key offline)"
  ;;
server)
  need_ca
  [ $# -gt 0 ] || { echo "usage: $0 server DIR NAME... (DNS names / IP addresses)" >&2; exit 2; }
  san=""
  for n in "$@"; do
    case "$n" in
      *[!0-9.:a-fA-F]*) san="$san,DNS:$n";;
      *) san="$san,IP:$n";;
    esac
  done
  san=${san#,}
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
    -keyout "$dir/server.key" -out "$dir/server.csr" -subj "/CN=$1" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' "$san" \
    > "$dir/server.ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -CAcreateserial -out "$dir/server.crt" -days $days -sha256 -extfile "$dir/server.ext" \
    2>/dev/null
  rm -f "$dir/server.csr" "$dir/server.ext"
  chmod 644 "$dir/server.crt"
  echo "broker certificate: $dir/server.crt for $san"
  ;;
meter)
  need_ca
  id="${1:?usage: $0 meter DIR ID [PASSWD] [KEYS]}"
  passwd="${2:-$dir/passwd}"
  keys="${3:-var/keys}"
  "$here/add-meter.sh" "$id" "$passwd" "$keys"
  mkdir -p "$dir/meters"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
    -keyout "$dir/meters/$id.key" -out "$dir/meters/$id.csr" -subj "/CN=$id" 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n' > "$dir/meters/$id.ext"
  openssl x509 -req -in "$dir/meters/$id.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -CAcreateserial -out "$dir/meters/$id.crt" -days $days -sha256 \
    -extfile "$dir/meters/$id.ext" 2>/dev/null
  rm -f "$dir/meters/$id.csr" "$dir/meters/$id.ext"
  echo "tls_ca = \"$dir/ca.crt\"    # the meter verifies the broker with this CA (port 8883)"
  echo "tls_cert = \"$dir/meters/$id.crt\"    # optional client certificate"
  echo "tls_key = \"$dir/meters/$id.key\""
  ;;
*)
  echo "usage: $0 ca|server|meter [DIR] ..." >&2; exit 2;;
esac
