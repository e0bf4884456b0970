"""The README's table from the result JSONs here: per context and CPU-tier format, perplexity (its
delta against auto, the unquantized tier, over the same scored tokens) and passkey accuracy, and
whether the issue's bounds hold (int8 <= 0.5%, int4 <= 3% perplexity increase; passkey within 2 points)."""

import json
from pathlib import Path

HERE = Path(__file__).parent
PPL_BOUND = {"int8": 0.5, "int4": 3.0}


def load(kind: str, ctx: str, fmt: str) -> dict | None:
    path = HERE / f"{kind}-{ctx}-{fmt}.json"
    return json.loads(path.read_text()) if path.exists() else None


def row(ctx: str, fmt: str) -> str:
    ppl, pk = load("ppl", ctx, fmt), load("ppl", ctx, "auto")
    key, key_auto = load("passkey", ctx, fmt), load("passkey", ctx, "auto")
    cells = [ctx, fmt]
    delta = None
    if ppl:
        cells.append(f"{ppl['value']:.4f} ({ppl['num_tokens']} tok, {ppl['num_windows']} win)")
        delta = 100 * (ppl["value"] / pk["value"] - 1) if pk else None
        cells.append("—" if fmt == "auto" else (f"{delta:+.3f}%" if delta is not None else "n/a"))
    else:
        cells += ["not run", "—"]
    cells.append(f"{100 * key['value']:.0f}% ({key['num_correct']}/{key['trials']})" if key else "not run")
    bounds = []
    if fmt in PPL_BOUND and delta is not None:
        bounds.append(f"ppl {'holds' if delta <= PPL_BOUND[fmt] else 'FAILS'}")
    if fmt != "auto" and key and key_auto:
        points = 100 * (key["value"] - key_auto["value"])
        bounds.append(f"passkey {'holds' if abs(points) <= 2 or points > 0 else 'FAILS'} ({points:+.0f} pt)")
    cells.append(", ".join(bounds) or "—")
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    print("| context | CPU tier format | perplexity | ppl delta vs auto | passkey accuracy | issue bounds |")
    print("|---|---|---|---|---|---|")
    for ctx in ("2k", "4k", "8k"):
        for fmt in ("auto", "int8", "int4"):
            if load("ppl", ctx, fmt) or load("passkey", ctx, fmt):
                print(row(ctx, fmt))
