"""Datasets (validation errors, resumable order), synthetic tasks, rewards and GRPO advantages."""

from __future__ import annotations

import json
import math

import pytest

from minpro_megatron.advantages import group_advantages
from minpro_megatron.data.dataset import DatasetError, PromptStream, load_problems
from minpro_megatron.data.tasks import task_split
from minpro_megatron.rewards import extract_boxed, math_reward, reward


def write_jsonl(path, rows) -> None:
    path.write_text("\n".join(json.dumps(r) if not isinstance(r, str) else r for r in rows) + "\n")


def test_jsonl_and_parquet_rows_load(tmp_path) -> None:
    f = tmp_path / "d.jsonl"
    write_jsonl(f, [{"prompt": "1+1=", "answer": 2}, {"prompt": "x?", "answer": "\\frac12", "data_source": "aime"}])
    probs = load_problems(f)
    assert [(p.prompt, p.answer, p.data_source) for p in probs] == [("1+1=", "2", "math"), ("x?", "\\frac12", "aime")]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["2+2="], "solution": ["4"]}), tmp_path / "d.parquet")
    (p,) = load_problems(tmp_path / "d.parquet", prompt_key="question", answer_key="solution")
    assert (p.prompt, p.answer) == ("2+2=", "4")


@pytest.mark.parametrize(
    "rows,match",
    [
        ([{"prompt": "", "answer": "1"}], r"line 1: field 'prompt' must be a non-empty string"),
        ([{"prompt": "a", "answer": "1"}, {"question": "b", "answer": "2"}], r"line 2: field 'prompt'.*data.prompt_key"),
        ([{"prompt": "a"}], r"line 1: field 'answer'.*data.answer_key"),
        (["{not json"], r":1: not valid JSON"),
        ([[1, 2]], r"line 1: expected an object"),
        ([{"prompt": "a", "answer": "1", "data_source": 3}], r"field 'data_source' must be a string"),
    ],
)
def test_bad_rows_raise_one_clear_error(tmp_path, rows, match) -> None:
    f = tmp_path / "bad.jsonl"
    write_jsonl(f, rows)
    with pytest.raises(DatasetError, match=match):
        load_problems(f)


def test_missing_and_unsupported_files(tmp_path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_problems(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="unsupported extension '.csv'"):
        load_problems(tmp_path / "d.csv")


def test_prompt_stream_is_seeded_and_resumable() -> None:
    train, evals = task_split("arithmetic", num_eval=100, seed=3)
    assert len(train) == 9900 and not {p.prompt for p in train} & {p.prompt for p in evals}
    a = PromptStream(train[:50], seed=1)
    first = a.take(30)
    state = a.state_dict()
    rest = a.take(40)  # crosses an epoch boundary
    b = PromptStream(train[:50], seed=1)
    b.load_state_dict(state)
    assert b.take(40) == rest
    assert PromptStream(train[:50], seed=1).take(30) == first
    assert PromptStream(train[:50], seed=2).take(30) != first


def test_rewards() -> None:
    assert reward("arithmetic", "1 01", "101") == 1.0
    assert reward("arithmetic", "100", "101") == 0.0
    assert extract_boxed("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert math_reward("the answer is \\boxed{0.5}", "\\frac{1}{2}") == 1.0
    assert math_reward("the answer is 0.5", "1/2") == 1.0
    assert math_reward("the answer is 0.5", "1/2", strict_format=True) == 0.0
    assert math_reward("\\boxed{3}", "4") == 0.0


def test_group_advantages() -> None:
    adv = group_advantages([1.0, 0.0, 0.0, 1.0])
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    assert adv == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std], rel=1e-5)
    assert group_advantages([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]
    assert group_advantages([1.0]) == [0.0]


def test_prompt_encoding_with_and_without_chat_template() -> None:
    from minpro_megatron.data.prompts import encode_prompt
    from minpro_megatron.models.tiny_hf import build_char_tokenizer

    tok = build_char_tokenizer()
    assert encode_prompt(tok, "12+3=") == [tok.bos_token_id] + tok.encode("12+3=", add_special_tokens=False)
    with pytest.raises(ValueError, match="data.chat_template=true but the tokenizer has no chat template"):
        encode_prompt(tok, "12+3=", chat_template=True)
    # role markers from the character alphabet: user x, system z, assistant a
    tok.chat_template = ("{% for m in messages %}{{ 'x' if m['role'] == 'user' else 'z' }}={{ m['content'] }},{% endfor %}"
                         "{% if add_generation_prompt %}a={% endif %}")
    ids = encode_prompt(tok, "12+3", chat_template=True)
    assert tok.decode(ids) == "x=12+3,a="
    msgs = json.dumps([{"role": "system", "content": "x"}, {"role": "user", "content": "1+1"}])
    assert tok.decode(encode_prompt(tok, msgs, chat_template=True)) == "z=x,x=1+1,a="


def test_reverse_task_long_answers_and_exact_rewards() -> None:
    """The staleness study's task: 32-digit strings reversed, so every answer is 33 generated tokens (digits +
    EOS); exact-match rewards accept only the full reversed string."""
    from minpro_megatron.models.tiny_hf import build_char_tokenizer

    train, evals = task_split("reverse", num_eval=50, seed=4, length=32)
    assert len(evals) == 50 and not {p.prompt for p in train} & {p.prompt for p in evals}
    tok = build_char_tokenizer()
    for p in evals[:10]:
        digits = p.prompt[:-1]
        assert p.prompt.endswith("=") and len(digits) == 32 and digits.isdigit() and p.answer == digits[::-1]
        assert len(tok.encode(p.answer, add_special_tokens=False)) + 1 >= 33  # + EOS
        assert reward("reverse", p.answer, p.answer) == 1.0
        assert reward("reverse", " " + p.answer + " ", p.answer) == 1.0  # whitespace is not an answer
        wrong_digit = p.answer[:-1] + str((int(p.answer[-1]) + 1) % 10)
        for bad in (digits if digits != p.answer else digits + "0", p.answer[:-1], p.answer + "0", wrong_digit, ""):
            assert reward("reverse", bad, p.answer) == 0.0, bad
    assert task_split("reverse", num_eval=50, seed=4, length=32) == (train, evals)  # seeded
    s_train, _ = task_split("sorting", num_eval=10, seed=0, length=32)
    assert all(p.answer == "".join(sorted(p.prompt[:-1].split(","))) and len(p.answer) == 32 for p in s_train[:20])
    with pytest.raises(ValueError, match="data.task_length"):
        task_split("reverse", num_eval=5, seed=0, length=0)
    with pytest.raises(ValueError, match="reverse"):
        task_split("nope", num_eval=5, seed=0)
