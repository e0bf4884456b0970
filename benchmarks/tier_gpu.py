"""The CPU tier on the GPU, with the engine's own transfer engine (Llama-3-8B shape, bf16, dummy weights):

  1. reload / store of scattered blocks through TransferEngine: GB/s vs the pinned copy rate, byte-exact
  2. a forward pass (prefill 1x2048, decode 64x2048 by CUDA graph) alone and with a 256-block
     reload or store running beside it on the copy streams: the pass's slowdown
  3. time to first token of a request whose 4096-token prefix sits in the CPU tier vs recomputing it,
     for both demotion policies, and with layer-wise loading off (whole blocks; the forward waits
     for the whole load before its first layer)

    python3 benchmarks/tier_gpu.py --out $OUT/tier.json        (GPU)
    python3 benchmarks/tier_gpu.py --dry-run --out /tmp/t.json  (CPU, tiny model, same code)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from kvtier import LLM, SamplingParams  # noqa: E402
from kvtier.benchmarks.prefix_hit import TAIL, prefix_hit_engine_args, prefix_hit_ttft  # noqa: E402
from kvtier.engine import transfer_engine  # noqa: E402
from kvtier.engine.transfer_engine import _InFlight  # noqa: E402
from kvtier.offload.hardware import host_link_bandwidth, synchronize, time_ms  # noqa: E402
from kvtier.scheduler.output import ScheduledRequest  # noqa: E402


def pinned_rate(device, nbytes=256 << 20) -> dict:
    if device.type != "cuda":
        return {}
    return {f"pinned_{name}_GBps": host_link_bandwidth(device, nbytes, to_device, iters=10) / 1e9
            for name, to_device in (("h2d", True), ("d2h", False))}


def release(device) -> None:
    """Let the next engine have the memory of the one just dropped."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def transfer_rates(eng: transfer_engine.TransferEngine, num_blocks: int, reps: int,
                   cpu_runs: bool = False, split: bool = False) -> dict:
    """num_blocks blocks at random GPU ids each way through the engine's TransferEngine, timed on
    its streams; CPU ids random (scattered) or one run of consecutive blocks (cpu_runs); the
    reload whole-block or layer group by layer group (split). issue_ms: the host's time to issue."""
    dev = eng.device
    ng, nc = eng.gpu_blocks.shape[0], eng.num_cpu_blocks
    g = torch.Generator().manual_seed(0)
    gpu_ids = torch.randperm(ng, generator=g)[:num_blocks].tolist()
    cpu_ids = list(range(num_blocks)) if cpu_runs else torch.randperm(nc, generator=g)[:num_blocks].tolist()
    pairs = list(zip(gpu_ids, cpu_ids))
    out = {"blocks": num_blocks, "block_bytes": eng.block_bytes, "cpu_ids": "consecutive" if cpu_runs else "random",
           "reload": f"{len(eng.group_layers)} layer groups" if split else "whole blocks"}
    with torch.no_grad():
        eng.gpu_blocks[gpu_ids] = torch.randn(eng.gpu_blocks[gpu_ids].shape, device=dev).to(eng.gpu_blocks.dtype)
    for direction in ("to_cpu", "to_gpu"):
        times, issue = [], []
        for _ in range(reps + 2):
            flight = _InFlight(-1, [])
            t0 = time.perf_counter()
            ranges = eng.layer_ranges(split and direction == "to_gpu")
            eng._issue(direction, pairs, flight, ranges) if eng.on_gpu else eng._copy_now(direction, pairs, ranges)
            issue.append((time.perf_counter() - t0) * 1e3)
            eng.synchronize()
            if eng.on_gpu:
                _, start, end = flight.timed[0]
                times.append(start.elapsed_time(end))
            else:
                times.append(1.0)
        ms = statistics.median(times[2:])
        out[f"{direction}_ms"] = ms
        out[f"{direction}_issue_ms"] = statistics.median(issue[2:])
        out[f"{direction}_GBps"] = num_blocks * eng.block_bytes / ms / 1e6
    # byte-exact: the blocks that went out and came back equal the GPU originals
    back = eng.cpu_blocks[cpu_ids].to(dev)
    original = eng.gpu_blocks[gpu_ids].reshape(back.shape)
    out["exact"] = bool(torch.equal(back.view(torch.int16), original.view(torch.int16)))
    return out


def forward_fns(llm: LLM, batch: int, ctx: int) -> dict:
    """Callables running one prefill (1 x ctx tokens) and one decode step (batch x ctx context)."""
    runner = llm.engine.runner
    bs = llm.engine.config.block_size
    per_seq = -(-(ctx + 1) // bs)
    vocab = llm.engine.model_config.vocab_size
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=0)

    def item(i, tokens, start):
        blocks = list(range(i * per_seq, (i + 1) * per_seq))
        all_ids = torch.randint(100, vocab, (ctx + 1,), generator=g).tolist()
        return ScheduledRequest(f"b{i}", tokens, start, tuple(blocks), True, params, tuple(all_ids), ctx)
    prefill = [item(0, torch.randint(100, vocab, (ctx,), generator=g).tolist(), 0)]
    decode = [item(i, [5], ctx) for i in range(batch)]
    runner.apply_block_diffs(prefill + decode)
    p_in, d_in = runner.prepare_inputs(prefill), runner.prepare_inputs(decode)
    return {"prefill": lambda: runner._logits(p_in), "decode": lambda: runner._logits(d_in)}, batch * per_seq


def overlap(llm: LLM, fns: dict, first_free_block: int, num_blocks: int, reps: int) -> dict:
    """Each pass alone, then with a reload / store of num_blocks issued just before it on the copy
    streams (the pass does not wait for it): slowdown of the pass and the copy's own rate."""
    eng, dev = llm.engine.worker.transfers, llm.engine.device
    ng, nc = eng.gpu_blocks.shape[0], eng.num_cpu_blocks
    gpu_ids = list(range(first_free_block, min(ng, first_free_block + num_blocks)))
    pairs = list(zip(gpu_ids, torch.randperm(nc)[:len(gpu_ids)].tolist()))
    out = {}
    with torch.inference_mode():
        for name, fn in fns.items():
            for _ in range(3):
                fn()
            synchronize(dev)
            out[f"{name}_alone_ms"] = time_ms(fn, dev, iters=reps, warmup=0)
            for direction in ("to_gpu", "to_cpu"):
                passes, rates = [], []
                for _ in range(reps):
                    synchronize(dev)
                    flight = _InFlight(-1, [])
                    if eng.on_gpu:
                        # the copy stream must not wait on earlier work: it starts with the pass
                        eng._issue(direction, pairs, flight, eng.layer_ranges(False))
                    passes.append(time_ms(fn, dev, iters=1, warmup=0))
                    eng.synchronize()
                    if eng.on_gpu:
                        _, start, end = flight.timed[0]
                        rates.append(len(pairs) * eng.block_bytes / start.elapsed_time(end) / 1e6)
                key = f"{name}_with_{direction}"
                out[f"{key}_ms"] = statistics.median(passes)
                out[f"{key}_slowdown"] = out[f"{key}_ms"] / out[f"{name}_alone_ms"] - 1
                out[f"{key}_copy_GBps"] = statistics.median(rates) if rates else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, same code paths")
    args = ap.parse_args()
    if args.dry_run:
        model, dev, ctx, batch, blocks, prefix, reps = "tiny-llama", "cpu", 64, 4, 8, 48, 2
        gpu_blocks, cpu_gib = 64, 0.01
    else:
        model, dev, ctx, batch, blocks, prefix, reps = "llama3-8b", "cuda", 2048, 64, 256, 4096, 9
        gpu_blocks, cpu_gib = 8704, 8.0
    llm = LLM(model, load_format="dummy", device=dev, num_gpu_blocks_override=gpu_blocks,
              kv_offloading_size=cpu_gib, max_num_seqs=batch, max_model_len=max(ctx + 64, prefix + 64),
              max_num_batched_tokens=max(ctx, prefix + 64), skip_tokenizer_init=True)
    device = llm.engine.device
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "model": model, "dtype": str(llm.engine.dtype), "block_size": llm.engine.config.block_size,
              "gpu_blocks": gpu_blocks, "cpu_blocks": llm.engine.host_pool.num_blocks,
              "command": "python3 benchmarks/tier_gpu.py " + " ".join(sys.argv[1:])}
    result.update(pinned_rate(device))
    eng = llm.engine.worker.transfers
    result["rows_2d_copy"] = eng.can_split  # the CUDA runtime's 2-D copy was found: loads can go layer-wise
    result["transfer"] = transfer_rates(eng, blocks, reps)
    result["transfer_variants"] = [transfer_rates(eng, blocks, reps, cpu_runs, split)
                                   for cpu_runs, split in ((False, True), (True, False), (True, True))
                                   if eng.can_split or not split]
    fns, used = forward_fns(llm, batch, ctx)
    result["overlap"] = {"batch": batch, "context": ctx, "blocks": blocks,
                         **overlap(llm, fns, used, blocks, reps)}
    # TTFT: a GPU pool of ~2.5 prompts, so three later prompts push the first one to the CPU tier;
    # with each demotion policy (write-back stores evicted blocks on the critical path of the
    # request that evicts them; write-through stored them earlier, beside other work)
    llm = fns = None
    release(device)
    result["ttft"] = {}
    for name, policy, per_layer in (("write-back", "write-back", True), ("write-through", "write-through", True),
                                    ("write-through, whole load first", "write-through", False)):
        llm = LLM(model, load_format="dummy", device=dev, kv_offloading_size=cpu_gib,
                  kv_offloading_policy=policy, **prefix_hit_engine_args(prefix),
                  max_num_seqs=8, skip_tokenizer_init=True)
        # the last: loads move whole blocks and the forward waits for all of them (no layer-wise overlap)
        llm.engine.worker.transfers.can_split &= per_layer
        result["ttft"][name] = prefix_hit_ttft(llm, prefix, TAIL, reps, evictors=3)
        llm = None
        release(device)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    t, o = result["transfer"], result["overlap"]
    print(f"\n{'what':<56}{'value':>12}")
    for k in ("pinned_h2d_GBps", "pinned_d2h_GBps"):
        if k in result:
            print(f"{k:<56}{result[k]:>12.1f}")
    print(f"{'reload (to_gpu) GB/s, 256 scattered blocks':<56}{t['to_gpu_GBps']:>12.1f}")
    print(f"{'store (to_cpu) GB/s':<56}{t['to_cpu_GBps']:>12.1f}")
    print(f"{'byte-exact':<56}{str(t['exact']):>12}")
    print(f"{'2-D copies (layer-wise loads) available':<56}{str(result['rows_2d_copy']):>12}")
    for r in result["transfer_variants"]:
        label = f"reload {r['reload']}, CPU ids {r['cpu_ids']} GB/s"
        print(f"{label:<56}{r['to_gpu_GBps']:>12.1f}")
    for name in fns_names(o):
        for d in ("to_gpu", "to_cpu"):
            print(f"{name + ' slowdown with ' + d:<56}{o[f'{name}_with_{d}_slowdown']:>12.3f}")
    for policy, tt in result["ttft"].items():
        print(f"{'TTFT recompute ' + str(prefix) + ' (s), ' + policy:<56}{tt['recompute_ttft_s']:>12.4f}")
        print(f"{'TTFT prefix in CPU tier (s), ' + policy:<56}{tt['cpu_hit_ttft_s']:>12.4f}")
        print(f"{'TTFT speedup, ' + policy:<56}{tt['speedup']:>12.2f}")


def fns_names(o: dict) -> list[str]:
    return [k[:-len("_alone_ms")] for k in o if k.endswith("_alone_ms")]


if __name__ == "__main__":
    main()
