"""Every name that travels between FedDMMR's server and its clients, defined once.

Record keys (the entries of a message's ``RecordDict``), the keys inside them, and the node-config
keys a SuperNode is started with. Flower's own keys that FedDMMR writes (``clipping_norm`` for
``fixedclipping_mod``, ``proximal-mu`` from ``FedProx``) are imported or named here too, so a grep
for a key finds its one home.
"""

from __future__ import annotations

from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

# ------------------------------------------------------------------ records of a message
ARRAYS = "arrays"  # ArrayRecord: the model (full in instructions, the stage's trained tensors in replies)
PROTOTYPES = "prototypes"  # ArrayRecord: CENTROIDS (+ SIZES in a client's reply)
METRICS = "metrics"  # MetricRecord of a reply
CONFIG = "config"  # ConfigRecord of an instruction
LAYOUT = "layout"  # ConfigRecord {ARRAYS: json layout} when ARRAYS holds one PACKED vector
STATUS = "status"  # ConfigRecord of a train reply that did not train (see TrainStatus)
SECAGG_EXTRAS = "feddmmr-plaintext"  # ConfigRecord of a SecAgg+ reply: what SecAgg+ would otherwise clear

# ------------------------------------------------------------------ inside the records
PACKED = "packed"  # the one array of a packed ARRAYS record
CENTROIDS = "centroids"
SIZES = "sizes"
NUM_EXAMPLES = "num-examples"  # a reply's aggregation weight (training positions; 1 for an evaluation)
PARTITION_ID = "partition-id"  # also the node-config key naming the user a node serves
STATUS_CODE = "code"
STATUS_REASON = "reason"
ARRAY_NAMES = "array-names"  # SECAGG_EXTRAS: the names of the masked tensors, in order
WITHHELD = "withheld"  # SECAGG_EXTRAS: why a client put zeros into the protocol instead of its update

# ------------------------------------------------------------------ instruction config entries
SERVER_ROUND = "server-round"
STAGE = "stage"
STAGE_ROUND = "stage-round"
CLIENT_LR = "client-lr"  # the client's SGD learning rate (the run config's ``lr`` is the central Adam's)
LOCAL_EPOCHS = "local-epochs"
RUN_KEY = "run-key"  # names the run on the clients' disks (node-local memory files)
SPLIT = "split"  # evaluation split: "valid" or "test"
PROXIMAL_MU = "proximal-mu"  # written by Flower's FedProx.configure_train
CLIPPING_NORM = KEY_CLIPPING_NORM  # read by Flower's fixedclipping_mod

# ------------------------------------------------------------------ node config and node state
NUM_PARTITIONS = "num-partitions"
STATE_DIR = "state-dir"  # node-local folder for the user's memory file
MEMORY = "memory"  # ArrayRecord in ``context.state``: the user's LocalDynamicMemory
