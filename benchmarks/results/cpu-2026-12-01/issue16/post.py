"""Adds the exact command and the issue's kv-quant keys to one result JSON (run.sh calls it)."""

import json
import sys

path, command = sys.argv[1], sys.argv[2]
with open(path) as f:
    record = json.load(f)
record = {"feature": "kv-quant", "command": command, "device": record["device"], "gpu_kv_dtype": record["dtype"],
          "cpu_kv_dtype": record["kv_offloading_dtype"], **record}
with open(path, "w") as f:
    json.dump(record, f, indent=2)
    f.write("\n")
