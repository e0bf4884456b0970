"""Find host-device syncs in decode steps (torch's sync debug mode 'warn', each call site counted
with its kvtier stack), and time the steps on the host. Llama-3-8B shape, batch 64 x 2048.

    python3 benchmarks/find_syncs.py [TEMPERATURE]    # 0: greedy (default); else with top_p 0.9
"""
import collections
import os
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from kvtier import LLM, SamplingParams  # noqa: E402
from kvtier.benchmarks.throughput import start_decoding  # noqa: E402

temp = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
llm = LLM("llama3-8b", load_format="dummy", max_model_len=2200, max_num_seqs=64, max_num_batched_tokens=16384)
eng = llm.engine
start_decoding(llm, 64, 2048, 40, SamplingParams(temperature=temp, top_p=0.9 if temp else 1.0))
for _ in range(3):  # into steady decoding
    eng.step()
where = collections.Counter()


def show(message, category, filename, lineno, file=None, line=None):
    stack = [f"{f.filename.split('kvtier/')[-1]}:{f.lineno} {f.name}"
             for f in traceback.extract_stack()[:-1] if "kvtier" in f.filename]
    where[" <- ".join(reversed(stack[-4:]))] += 1



warnings.showwarning = show
warnings.simplefilter("always")
torch.cuda.set_sync_debug_mode(1)
times = []
for _ in range(10):
    t = time.perf_counter()
    eng.step()
    times.append((time.perf_counter() - t) * 1e3)
torch.cuda.set_sync_debug_mode(0)
print("async", eng.async_scheduling, "temp", temp, "step ms (host wall)", [round(x, 2) for x in times])
for k, v in where.most_common(12):
    print(v, k)
