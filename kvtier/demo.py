"""`make demo`: the default model answers a few prompts and a multi-turn chat, then a summary table;
then the CPU tier at work.

Later chat turns resend the whole conversation; the prefix cache serves the part already computed.
In the tier part, several users chat in turn with a GPU KV pool too small for all their
conversations: with the CPU tier off, a returning user's history has been evicted and is
recomputed; with it on, the history was demoted to CPU memory and comes back by copy.
"""

from __future__ import annotations

import dataclasses

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
TIER_RESULTS = "benchmarks/results/h100-2026-11-22-tier"  # where the GPU measurements live


@dataclasses.dataclass
class _Turn:
    label: str
    num_prompt_tokens: int
    gpu_hit: int
    cpu_hit: int
    ttft_s: float

    @property
    def recomputed(self) -> int:
        return self.num_prompt_tokens - self.gpu_hit - self.cpu_hit


def tier_demo(gpu_blocks: int = 14, cpu_gib: float = 0.25) -> None:
    """Three users take turns; their histories do not all fit the small GPU pool."""
    print(f"\n== The CPU KV tier ==\n{len(USERS)} users take turns, {1 + len(FOLLOW_UPS)} turns each; every turn "
          f"resends the user's whole conversation.\nThe GPU KV pool holds {gpu_blocks} blocks of 16 tokens, too few "
          "for all three histories. The same conversations run twice:\n  tier off: a returning user's history was "
          f"evicted and is recomputed;\n  tier on ({cpu_gib} GiB): its blocks were also copied to CPU memory, and "
          "come back from there.")
    runs = {on: _tier_run(on, gpu_blocks, cpu_gib) for on in (False, True)}
    _print_tier_table(runs[False][0], runs[True][0])
    _print_tier_summary(runs[False][0], runs[True][0], runs[True][1], runs[True][2])


def _tier_run(cpu_tier: bool, gpu_blocks: int, cpu_gib: float) -> tuple[list[_Turn], dict, str]:
    """The users' turns on a fresh engine: (one _Turn per request, the engine's stats, its device)."""
    llm = LLM(num_gpu_blocks_override=gpu_blocks, max_model_len=gpu_blocks * 16,
              kv_offloading_size=cpu_gib if cpu_tier else 0, max_num_seqs=1)
    params = SamplingParams(temperature=0.0, max_tokens=32)
    chats = [[{"role": "user", "content": u}] for u in USERS]
    turns = []
    for turn in range(1 + len(FOLLOW_UPS)):
        for user, messages in enumerate(chats):
            out = llm.chat(messages, params, use_tqdm=False)[0]
            messages += [{"role": "assistant", "content": out.outputs[0].text},
                         {"role": "user", "content": FOLLOW_UPS[min(turn, len(FOLLOW_UPS) - 1)]}]
            m = out.metrics
            hits = m.num_cached_tokens_by_tier
            turns.append(_Turn(f"user {user + 1} turn {turn + 1}", m.num_prompt_tokens, hits["gpu"], hits["cpu"],
                               m.ttft_s or 0.0))
    return turns, llm.engine.stats(), llm.engine.device.type


def _print_tier_table(off: list[_Turn], on: list[_Turn]) -> None:
    print(f"\n{'':>14}  {'':>6}  {' tier off ':-^24}  {' tier on ':-^33}")
    print(f"{'request':>14}  {'prompt':>6}  {'GPU hit':>7}  {'recomp':>6}  {'TTFT s':>7}  "
          f"{'GPU hit':>7}  {'CPU hit':>7}  {'recomp':>6}  {'TTFT s':>7}")
    for a, b in zip(off, on):
        print(f"{a.label:>14}  {a.num_prompt_tokens:>6}  {a.gpu_hit:>7}  {a.recomputed:>6}  {a.ttft_s:>7.3f}  "
              f"{b.gpu_hit:>7}  {b.cpu_hit:>7}  {b.recomputed:>6}  {b.ttft_s:>7.3f}")
    print("(prompt: prompt tokens; GPU hit / CPU hit: of them served from the cache in that tier; "
          "recomp: computed again)")


def _print_tier_summary(off: list[_Turn], on: list[_Turn], stats: dict, device: str) -> None:
    served = [i for i, t in enumerate(on) if t.cpu_hit]
    saved = sum(t.recomputed for t in off) - sum(t.recomputed for t in on)
    print(f"\nWhat the CPU tier bought: {sum(t.cpu_hit for t in on)} prompt tokens of {len(served)} returning "
          f"turn(s) came from CPU memory instead of being\nrecomputed; the model ran "
          f"{sum(t.recomputed for t in off)} -> {sum(t.recomputed for t in on)} prompt tokens ({saved} fewer).")
    if served:
        print(f"TTFT of those turns: mean {_mean(off, served):.3f} s with the tier off, "
              f"{_mean(on, served):.3f} s with it on.")
    print(f"Traffic: {stats['blocks_to_cpu_total']} blocks ({stats['bytes_to_cpu_total'] / 2**20:.1f} MiB) copied "
          f"to CPU, {stats['blocks_to_gpu_total']} ({stats['bytes_to_gpu_total'] / 2**20:.1f} MiB) loaded back, "
          f"{stats['num_swaps_out_total']} swaps, {stats['num_evictions_cpu_total']} CPU evictions.")
    if device == "cpu":
        print("This machine has no GPU: both pools are ordinary memory, and a \"load\" is a copy by the same cores "
              "that compute.\nThe tier saves the recomputation counted above; whether TTFT drops with it here "
              "depends on what else\nthe cores are doing (on busy cores TTFT varies between runs by more than this "
              "saving). On a GPU, where a\nload crosses PCIe beside the compute, mean multi-turn TTFT was 1.5x lower "
              f"with the tier on an H100\n({TIER_RESULTS}).")


def _mean(turns: list[_Turn], indices: list[int]) -> float:
    return sum(turns[i].ttft_s for i in indices) / len(indices)


if __name__ == "__main__":
    main()
    tier_demo()
