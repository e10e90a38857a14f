#!/bin/sh
# The image's entrypoint: `owq serve` on $OWQ_HOST:$OWQ_PORT with $OWQ_DEVICE; the arguments
# (CMD) name the checkpoint, the adapters dir and any other `owq serve` option. The HEALTHCHECK
# probes /ready on the same $OWQ_PORT, so change the port with -e OWQ_PORT=..., not --port.
set -eu
exec owq serve --host "${OWQ_HOST:-0.0.0.0}" --port "${OWQ_PORT:-8000}" \
  --device "${OWQ_DEVICE:-cpu}" "$@"
