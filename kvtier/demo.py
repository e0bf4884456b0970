"""`make demo`: the default model answers a few prompts and a multi-turn chat, then a summary table;
then the CPU tier at work.

Later chat turns resend the whole conversation; the prefix cache serves the part already computed.
In the tier part, several users chat in turn with a GPU KV pool too small for all their
conversations: with the CPU tier off, a returning user's history has been evicted and is
recomputed; with it on, the history was demoted to CPU memory and comes back by copy.
"""

from __future__ import annotations

from kvtier import LLM, SamplingParams

QUESTIONS = ["What is the capital of France?", "Name three colors of the rainbow.",
             "What is 2 + 2? Answer with a number."]
CHAT_TURNS = ["Hi! Can you suggest a name for a small orange cat?",
              "Nice. Why did you pick that name?",
              "Now suggest a name for its sister, a grey cat."]


def _row(label: str, out) -> tuple:
    m = out.metrics
    seconds = m.e2e_s or 0.0
    return (label, m.num_prompt_tokens, m.num_cached_tokens, m.num_output_tokens,
            m.num_output_tokens / seconds if seconds > 0 else 0.0, m.ttft_s or 0.0)


def _print_table(rows: list[tuple]) -> None:
    head = ("request", "prompt tok", "cached tok", "output tok", "tok/s", "TTFT s")
    print("\n" + "  ".join(f"{h:>12}" for h in head))
    for label, *vals in rows:
        print(f"{label:>12}  " + "  ".join(f"{v:>12.2f}" if isinstance(v, float) else f"{v:>12}" for v in vals))


def main() -> None:
    llm = LLM()
    params = SamplingParams(temperature=0.0, max_tokens=64)
    rows = []
    outs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], params)  # one batch
    for i, (q, out) in enumerate(zip(QUESTIONS, outs)):
        print(f"Q: {q}\nA: {out.outputs[0].text.strip()}\n")
        rows.append(_row(f"prompt {i + 1}", out))
    messages: list[dict[str, str]] = []
    for turn, text in enumerate(CHAT_TURNS, 1):
        messages.append({"role": "user", "content": text})
        out = llm.chat(messages, params, use_tqdm=False)[0]
        reply = out.outputs[0].text.strip()
        messages.append({"role": "assistant", "content": reply})
        print(f"[chat turn {turn}] user: {text}\n[chat turn {turn}] assistant: {reply}\n")
        rows.append(_row(f"chat turn {turn}", out))
    _print_table(rows)
    total_out = sum(r[3] for r in rows)
    print(f"\n{total_out} output tokens; chat turns 2+ reuse "
          f"{sum(r[2] for r in rows[len(QUESTIONS) + 1:])} cached prompt tokens "
          f"(block size {llm.engine.config.block_size}).")


USERS = ["Tell me about the history of Paris in a few sentences.",
         "What are good habits for learning to play the piano?",
         "Explain how a bicycle stays upright."]
FOLLOW_UPS = ["Can you say more about that?", "Summarize that in one sentence."]


def tier_demo(gpu_blocks: int = 14, cpu_gib: float = 0.25) -> None:
    """Three users take turns; their histories do not all fit the small GPU pool."""
    params = SamplingParams(temperature=0.0, max_tokens=32)
    totals = {}
    for cpu_tier in (False, True):
        llm = LLM(num_gpu_blocks_override=gpu_blocks, max_model_len=gpu_blocks * 16,
                  kv_offloading_size=cpu_gib if cpu_tier else 0, max_num_seqs=1)
        chats = [[{"role": "user", "content": u}] for u in USERS]
        rows, computed = [], llm.engine.runner.num_computed_tokens
        for turn in range(1 + len(FOLLOW_UPS)):
            for user, messages in enumerate(chats):
                out = llm.chat(messages, params, use_tqdm=False)[0]
                messages += [{"role": "assistant", "content": out.outputs[0].text},
                             {"role": "user", "content": FOLLOW_UPS[min(turn, len(FOLLOW_UPS) - 1)]}]
                tiers = out.metrics.num_cached_tokens_by_tier
                rows.append((f"user {user + 1} turn {turn + 1}", out.metrics.num_prompt_tokens,
                             tiers["gpu"], tiers["cpu"], out.metrics.ttft_s or 0.0))
        stats = llm.engine.stats()
        totals[cpu_tier] = (llm.engine.runner.num_computed_tokens - computed, stats)
        print(f"\nCPU tier {'on' if cpu_tier else 'off'} ({gpu_blocks} GPU blocks of 16 tokens):")
        print("  ".join(f"{h:>16}" for h in ("request", "prompt tok", "GPU hit tok", "CPU hit tok", "TTFT s")))
        for label, *vals in rows:
            print(f"{label:>16}  " + "  ".join(f"{v:>16.3f}" if isinstance(v, float) else f"{v:>16}" for v in vals))
    (off_tokens, _), (on_tokens, on) = totals[False], totals[True]
    print(f"\nTokens run through the model: {off_tokens} with the CPU tier off, {on_tokens} with it on.")
    print(f"CPU tier: {on['blocks_to_cpu_total']} blocks copied to CPU, {on['blocks_to_gpu_total']} loaded back, "
          f"{on['num_swaps_out_total']} swaps, {on['bytes_to_cpu_total'] / 2**20:.1f} MiB to CPU and "
          f"{on['bytes_to_gpu_total'] / 2**20:.1f} MiB back, {on['num_evictions_cpu_total']} CPU evictions.")


if __name__ == "__main__":
    main()
    tier_demo()
