"""`make demo`: the default model answers a few prompts and a multi-turn chat, then a summary table.

Later chat turns resend the whole conversation; the prefix cache serves the part already computed.
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


if __name__ == "__main__":
    main()
