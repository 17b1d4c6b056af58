#!/bin/sh
# Container entrypoint: make D: and E: writable for the user gateway, then run the gateway as that user.
# Bind-mounted host folders arrive owned by whoever created them; the gateway must never run as root.
set -eu
if [ "$(id -u)" = 0 ]; then
  for volume in /data/d /data/e; do
    mkdir -p "$volume"
    # only when needed: a recursive chown of a large D: on every start would take long
    if [ "$(stat -c %u "$volume")" != "$(id -u gateway)" ]; then
      chown -R gateway:gateway "$volume"
    fi
  done
  exec setpriv --reuid gateway --regid gateway --init-groups -- dicom-mail-gateway "$@"
fi
exec dicom-mail-gateway "$@"
