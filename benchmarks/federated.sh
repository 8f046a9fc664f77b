#!/usr/bin/env bash
# Federated runs on ML-100K (one Flower node per user, Ray simulation on this machine).
#   benchmarks/federated.sh NAME "run-config overrides"
# writes benchmarks/results/federated_NAME.json: the ServerApp's summary.json plus the exact
# command, the run config and the machine. DATA/SHARED as in central.sh.
set -euo pipefail
name=$1; shift
overrides=${1:-}
invocation="DATA=${DATA:-data/ml-100k} SHARED=${SHARED:-../shared/data} benchmarks/federated.sh $name '${1:-}'"
DATA=$(realpath "${DATA:-data/ml-100k}")
SHARED=$(realpath "${SHARED:-../shared/data}")
NODES=${NODES:-943}
repo=$PWD
# flwr run edits pyproject.toml (it migrates [tool.flwr.federations]): run from a copy of the app.
app=$(mktemp -d)
cp -r pyproject.toml README.md feddmmr_flower feddmmr_wire client_app server_app strategies "$app/"
export FLWR_HOME=${FLWR_HOME:-$app/.flwr}
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
mkdir -p outputs
base="data-dir='$DATA' descriptions='$SHARED/ml-100k-llm/item_descriptions.json' visual-features=true posters-dir='$SHARED/ml-1m/posters' movies-dat='$SHARED/ml-1m/movies.dat' output-dir='$PWD/outputs' cache-dir='$PWD/data/cache' run-name='fed-$name'"
cmd=(flwr run . --stream --federation-config "num-supernodes=$NODES client-resources-num-cpus=1" --run-config "$base $overrides")
printf '%q ' "${cmd[@]}" > "outputs/fed-$name.command"
(cd "$app" && "${cmd[@]}")
# flwr run leaves its local SuperLink running: stop it (and its children).
pkill -f "$FLWR_HOME" || true
python - "$name" "$invocation" "$PWD" "$DATA" "$SHARED" <<'PY'
import json, os, sys
from pathlib import Path
from feddmmr_flower.provenance import machine_description
name, invocation, repo, data, shared = sys.argv[1:6]

def relative(text: str) -> str:  # no machine-specific paths in committed results
    for absolute in sorted({data, shared, repo}, key=len, reverse=True):
        text = text.replace(absolute, os.path.relpath(absolute, repo))
    return text

run = Path("outputs") / f"fed-{name}"
summary = json.loads((run / "summary.json").read_text())
config = json.loads((run / "config.json").read_text())
history = json.loads((run / "history.json").read_text())["rounds"]
curve = [{"round": r["round"], "stage": r["stage"], "valid_NDCG@10": r["valid"].get("NDCG@10")} for r in history if r["valid"]]
out = {"command": invocation, "flwr_command": (Path("outputs") / f"fed-{name}.command").read_text().strip(),
       "machine": machine_description(), "config": config, **summary, "validation_curve": curve}
Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
Path(f"benchmarks/results/federated_{name}.json").write_text(relative(json.dumps(out, indent=2)) + "\n")
print(f"wrote benchmarks/results/federated_{name}.json")
PY
