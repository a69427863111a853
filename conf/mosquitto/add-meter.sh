#!/bin/sh
# Create broker credentials and a command key for one meter.
#   conf/mosquitto/add-meter.sh <meter-id> [passwd-file] [keys-dir]
# Prints the lines for the meter's config file. The meter id is also its MQTT user name
# (the ACL uses it), so it may contain only letters, digits, '-' and '_'.
set -eu
id="${1:?usage: add-meter.sh <meter-id> [passwd-file] [keys-dir]}"
passwd="${2:-/etc/mosquitto/lipari/passwd}"
keys="${3:-var/keys}"
case "$id" in
  *[!A-Za-z0-9_-]*|"") echo "meter id '$id': use only A-Z a-z 0-9 - _" >&2; exit 2;;
esac
[ ${#id} -le 32 ] || { echo "meter id '$id' is longer than 32 characters" >&2; exit 2; }
pw=$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')
key=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
[ -f "$passwd" ] || { touch "$passwd"; chmod 600 "$passwd"; }
mosquitto_passwd -b "$passwd" "$id" "$pw"
mkdir -p "$keys"
umask 077
printf '%s\n' "$key" > "$keys/$id.key"
echo "# meter $id: put these in the meter's config (and keep them secret)"
echo "mqtt_user = \"$id\""
echo "mqtt_password = \"$pw\""
echo "cmd_key = \"$key\"    # also in $keys/$id.key for lipari cmd"
echo "# reload the broker: kill -HUP \$(pidof mosquitto)"
