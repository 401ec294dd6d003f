#!/bin/sh
# Install the Debian packages that the tests drive for real (dcmtk, dicom3tools, orthanc,
# orthanc-dicomweb, prometheus, postgresql, ...) as tools only: their services (Orthanc,
# Prometheus, the exporters that come along as recommended packages, PostgreSQL's packaged
# cluster) are neither started by the install nor enabled to start at boot. Run as root:
# `make test` calls it through sudo when it is not root.
# Usage: tests/install-debian-tools.sh PACKAGE...
set -eu
policy=/usr/sbin/policy-rc.d  # invoke-rc.d asks it before starting a service (101: don't)
before=$(mktemp)
after=$(mktemp)
cleanup="rm -f $before $after"
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    cleanup="$cleanup $policy"
fi
trap '$cleanup' EXIT
dpkg-query -W -f '${Package}\n' | sort >"$before"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
dpkg-query -W -f '${Package}\n' | sort >"$after"
# Every service the newly installed packages enabled, disabled again: systemd units (with
# their init.d twins), or on a host without systemd, the init.d scripts' rc links.
for package in $(comm -13 "$before" "$after"); do
    if command -v systemctl >/dev/null; then
        for unit in $(dpkg -L "$package" | grep -E '^/(usr/)?lib/systemd/system/[^/@]+\.(service|socket|timer)$'); do
            systemctl disable --quiet "$(basename "$unit")"
        done
    else
        for script in $(dpkg -L "$package" | grep -E '^/etc/init\.d/'); do
            update-rc.d "$(basename "$script")" disable
        done
    fi
done
