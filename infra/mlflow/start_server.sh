#!/usr/bin/env bash
# Start a real MLflow tracking server on loopback.
#   infra/mlflow/start_server.sh [PORT] [DATA_DIR]
# Backend: sqlite in DATA_DIR (set BACKEND_URI=postgresql://user:pw@host/db for Postgres);
# artifacts are served by the server from DATA_DIR/artifacts (--serve-artifacts), so
# clients need no direct access to the artifact store.
# Then: export MLFLOW_TRACKING_URI=http://127.0.0.1:PORT; python flows/full_pipeline.py run
set -euo pipefail
PORT="${1:-5000}"
DATA_DIR="$(realpath -m "${2:-outputs/mlflow-server}")"
mkdir -p "$DATA_DIR/artifacts"
BACKEND_URI="${BACKEND_URI:-sqlite:///$DATA_DIR/mlflow.db}"
exec mlflow server --host 127.0.0.1 --port "$PORT" \
  --backend-store-uri "$BACKEND_URI" \
  --artifacts-destination "$DATA_DIR/artifacts" --serve-artifacts \
  --workers 1
