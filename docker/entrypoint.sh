#!/bin/sh
# The agent needs headers for the running kernel (bcc compiles at load time): setup.sh links them
# for this host's kernel release, a no-op when they are there. The gateway needs no kernel parts.
set -e
if [ "${1:-agent}" = "agent" ]; then
  /opt/l7proxy/scripts/setup.sh --product
fi
exec /opt/l7proxy/.venv/bin/l7proxy "$@"
