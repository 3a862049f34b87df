"""FSx for Lustre on a DLAMI host, as root at boot: client, mount, run area.

Written once for the backend's per-launch user data (mmp.backends.dlami) and the
stack's launch template (mmp.infra.dlami). The client comes from AWS's own FSx
Lustre client repository for Ubuntu, as AWS documents it for Ubuntu 22.04 and 24.04
("Installing the Lustre client", FSx for Lustre User Guide): the repository key
from fsx-lustre-client-repo-public-keys, the `deb … /ubuntu <codename> main` list,
then `lustre-client-modules-$(uname -r)`. Ubuntu's own archive has no such package.

Every failure stops the script and writes its reason to HOST_FAILED_MARKER, which the
backend's readiness check reports at once (no training on an empty root-disk /fsx).
The run area (work and output roots) is made for the SSH user, who creates the run
folders in it; the file system's root belongs to root.
"""

from __future__ import annotations

HOST_FAILED_MARKER = "/run/mmp-host-setup-failed"
CLIENT_KEY_URL = "https://fsx-lustre-client-repo-public-keys.s3.amazonaws.com/fsx-ubuntu-public-key.asc"
CLIENT_REPO_URL = "https://fsx-lustre-client-repo.s3.amazonaws.com/ubuntu"
KEYRING = "/usr/share/keyrings/fsx-ubuntu-public-key.gpg"
SOURCES_LIST = "/etc/apt/sources.list.d/fsxlustreclientrepo.list"

# Arguments: DNS name, mount name, mount point, owner of the run area, the run area's folders…
FSX_SCRIPT = r"""set -uo pipefail
dns=$1 mount_name=$2 mount_point=$3 owner=$4
shift 4
fail() { echo "mmp host setup: FSx for Lustre at $mount_point: $*" | tee __MARKER__ >&2; exit 1; }
if ! modinfo lustre >/dev/null 2>&1; then
  curl -fsSL __KEY_URL__ | gpg --dearmor | tee __KEYRING__ >/dev/null \
    || fail "could not fetch the FSx Lustre client repository key"
  codename=$(lsb_release -cs) || fail "lsb_release -cs failed: not an Ubuntu host?"
  echo "deb [signed-by=__KEYRING__] __REPO_URL__ $codename main" | tee __SOURCES__ >/dev/null \
    || fail "could not write __SOURCES__"
  apt-get -o DPkg::Lock::Timeout=300 update -q || fail "apt-get update failed"
  kernel=$(uname -r)
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q "lustre-client-modules-$kernel" \
    || fail "the FSx client repository has no lustre-client-modules-$kernel for this AMI's kernel ($codename)"
fi
mkdir -p "$mount_point" || fail "could not create the mount point"
mountpoint -q "$mount_point" || mount -t lustre -o relatime,flock "$dns@tcp:/$mount_name" "$mount_point" \
  || fail "mount -t lustre $dns@tcp:/$mount_name failed (file system state, security group port 988)"
mountpoint -q "$mount_point" || fail "not a mount point after mounting"
install -d -o "$owner" -g "$owner" -m 0755 "$@" || fail "could not create the run area $* for $owner"
""".replace("__MARKER__", HOST_FAILED_MARKER).replace("__KEY_URL__", CLIENT_KEY_URL).replace(
    "__KEYRING__", KEYRING).replace("__REPO_URL__", CLIENT_REPO_URL).replace("__SOURCES__", SOURCES_LIST)


def fsx_argv(dns_name: str, mount_name: str, mount_point: str, owner: str, run_area: list[str]) -> list[str]:
    """The host step as an argv (a cloud-init `runcmd` entry, or quoted into a shell script)."""
    return ["bash", "-c", FSX_SCRIPT, "mmp-fsx", dns_name, mount_name, mount_point, owner, *run_area]
