"""CLI: engine flags reach the engine, errors are clear and exit non-zero, chat reads piped input.

Help on every command: test_cli_help.py."""

from __future__ import annotations

import io

import pytest

from kvtier.cli import _user_lines, build_parser, engine_kwargs, main


def test_piped_chat_echoes_each_message_on_its_own_line(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi there\n\n  And again  \n"))
    assert list(_user_lines(interactive=False)) == ["Hi there", "And again"]  # blank lines skipped
    out, err = capsys.readouterr()
    assert out == "you> Hi there\nyou> And again\n" and err == ""  # no prompts, no banner


def test_typed_chat_prompts_and_stops_at_an_empty_line(monkeypatch, capsys):
    typed = iter(["Hi", "", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt: (print(prompt, end=""), next(typed))[1])
    assert list(_user_lines(interactive=True)) == ["Hi"]
    out, err = capsys.readouterr()
    assert out == "you> you> " and "empty line or Ctrl-D" in err


def test_chat_refuses_n_above_1():
    with pytest.raises(SystemExit, match="one reply per turn"):
        main(["chat", "--n", "2"])


def test_engine_flags_have_vllm_names():
    args = build_parser().parse_args([
        "generate", "m", "--gpu-memory-utilization", "0.5", "--max-model-len", "99", "--max-num-seqs", "3",
        "--max-num-batched-tokens", "77", "--block-size", "32", "--no-enable-prefix-caching",
        "--dtype", "bfloat16", "--seed", "4", "--load-format", "dummy", "--device", "cpu",
        "--kv-cache-memory", "1GiB"])
    kw = engine_kwargs(args)
    assert kw["model"] == "m" and kw["gpu_memory_utilization"] == 0.5 and kw["max_model_len"] == 99
    assert kw["max_num_seqs"] == 3 and kw["max_num_batched_tokens"] == 77 and kw["block_size"] == 32
    assert kw["enable_prefix_caching"] is False and kw["dtype"] == "bfloat16" and kw["seed"] == 4
    assert kw["kv_cache_memory"] == "1GiB"


def test_generate_from_prompt_file_with_tiny_model(tiny_model_dir, tmp_path, capsys):
    # A tiny model has no tokenizer: borrow none, check the error path, then check JSON with ids.
    path, _ = tiny_model_dir("tiny-llama")
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    assert main(["generate", str(path), "--prompt-file", str(prompts)]) == 2
    assert "no tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "temperature=-1.0"),
    (["--top-p", "0"], "top_p=0.0"),
    (["--max-model-len", "99999"], "max_model_len=99999"),
])
def test_bad_values_exit_2_with_message(flags, message, capsys, tiny_model_dir):
    path, _ = tiny_model_dir("tiny-llama")
    assert main(["generate", str(path), "--prompt", "x", *flags]) == 2
    assert message in capsys.readouterr().err


def test_no_prompt_is_an_error(capsys):
    with pytest.raises(SystemExit, match="no prompt given"):
        main(["generate"])
