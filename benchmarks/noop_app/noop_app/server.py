"""Sends one train message per node per round and times each round (written as JSON)."""

import json
import random
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds, min_nodes = int(context.run_config["rounds"]), int(context.run_config["min-nodes"])
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        time.sleep(1.0)
    # Optional payload (echoed back by the client): k arrays of n float32 each, to separate Flower's
    # per-message cost from its per-array cost.
    k, n = int(context.run_config["payload-arrays"]), int(context.run_config["payload-floats"])
    payload = (
        RecordDict(
            {
                "arrays": ArrayRecord(
                    {f"a{i}": Array(np.random.default_rng(i).standard_normal(n).astype(np.float32)) for i in range(k)}
                )
            }
        )
        if k
        else RecordDict()
    )
    seconds = []
    sample = int(context.run_config.get("sample", 0))  # nodes per round (0: all), as a strategy samples
    rng = random.Random(0)
    for _ in range(rounds):
        tick = time.time()
        chosen = rng.sample(nodes, sample) if 0 < sample < len(nodes) else nodes
        messages = [Message(content=payload, dst_node_id=node, message_type="train") for node in chosen]
        replies = list(grid.send_and_receive(messages))
        failed = [r for r in replies if r.has_error()]
        if failed:
            raise RuntimeError(f"{len(failed)} no-op replies failed: {failed[0].error.reason}")
        seconds.append(time.time() - tick)
        print(f"no-op round {len(seconds)}/{rounds}: {seconds[-1]:.2f} s", flush=True)
    output = str(context.run_config["output"])
    if output:
        Path(output).write_text(
            json.dumps(
                {
                    "nodes": len(nodes),
                    "sample": sample,
                    "round_seconds": seconds,
                    "payload_arrays": k,
                    "payload_floats": n,
                }
            )
        )
