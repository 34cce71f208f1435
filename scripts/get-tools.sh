#!/usr/bin/env bash
# The tools the tests run for real, from Debian's packages (as root, with apt-get):
#   the launch scripts' lint:                shellcheck
#   slurmctld slurmd slurm-client munge      a real SLURM cluster on this host
#                                            (scripts/slurm-local.sh, tests/test_slurm.py)
#   openmpi-bin                              mpirun (tests/test_mpi.py)
#   faketime                                 a process's clock shifted (tests/test_gcs_faults.py)
# Without root or apt-get this is harmless: the tests that need a missing tool skip
# and say which. gcloud (the Cloud SDK, on this project's machine image) is not
# installed here: the flag checks skip without it.
set -euo pipefail
want=()
command -v shellcheck >/dev/null 2>&1 || want+=(shellcheck)
command -v slurmctld >/dev/null 2>&1 || want+=(slurmctld)
command -v slurmd >/dev/null 2>&1 || want+=(slurmd)
command -v sbatch >/dev/null 2>&1 || want+=(slurm-client)
command -v munged >/dev/null 2>&1 && [ -e /etc/munge/munge.key ] || want+=(munge)
command -v mpirun >/dev/null 2>&1 || want+=(openmpi-bin)
command -v faketime >/dev/null 2>&1 || want+=(faketime)
if [ ${#want[@]} = 0 ]; then
  echo "tools: shellcheck, SLURM, munge, Open MPI and faketime found"; exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "tools: installing Debian's ${want[*]}"
  # No daemon may start from a package's install script (there is no init system
  # here anyway); the tests start and stop their own by PID.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  rc=0
  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q --no-install-recommends "${want[@]}" >/dev/null; } || rc=$?
  rm -f /usr/sbin/policy-rc.d
  [ "$rc" = 0 ] && exit 0
  echo "tools: apt-get could not install ${want[*]}" >&2
fi
echo "tools: missing ${want[*]}; the tests that need them skip"
