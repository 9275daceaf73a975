#!/usr/bin/env bash
# Installs the system packages some tests need, when they are absent and we are root.
# Without root, it says what is missing; those tests then skip with the reason.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then need+=(postgresql); fi
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v pdftoppm >/dev/null 2>&1 || need+=(poppler-utils)
# The container image test: an engine it can start (dockerd, from docker.io) and debootstrap
# to make a Python base image from the Debian mirror when Docker Hub is out of reach.
# (sbin is not on every PATH, hence the full paths.)
[ -x /usr/sbin/dockerd ] || command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
[ -x /usr/sbin/debootstrap ] || command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
  echo "note: not root, so not installing ${need[*]}; the tests that need them will skip" >&2
  exit 0
fi
echo "installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
