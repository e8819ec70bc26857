"""Parsing and validation of SGLang /generate answers (no servers: the dicts are real 0.5.23 answers)."""

from __future__ import annotations

import copy

import pytest

from minpro_megatron.rollout.types import SampleGroup, SamplingParams, ServerResponseError, parse_generate_output

# A live answer of sglang 0.5.23 (CPU, tiny Qwen3-MoE), with its version spans edited to show a change
# of weights mid-response (as after a retract pause).
LIVE = {
    "text": "z=)",
    "output_ids": [31, 17, 19, 2],
    "meta_info": {
        "id": "64ce60a69f0443e987c20d96c88ab5ad",
        "finish_reason": {"type": "stop", "matched": 2},
        "prompt_tokens": 6,
        "weight_version": "4",
        "output_token_logprobs": [[-2.09, 31, None], [-3.99, 17, None], [-2.06, 19, None], [-2.98, 2, None]],
        "weight_versions": [{"version": "3", "start": 0, "end": 1}, {"version": "4", "start": 1, "end": 4}],
    },
}


def parse(obj, **kw):
    return parse_generate_output(obj, prompt_ids=[4, 5, 13], prompt_index=7, sample_index=1, server_url="http://s", **kw)


def test_parses_live_answer_into_typed_sample():
    s = parse(LIVE)
    assert s.response_ids == [31, 17, 19, 2]
    assert s.logprobs == [-2.09, -3.99, -2.06, -2.98]
    assert s.weight_versions == [3, 4, 4, 4] and (s.min_version, s.max_version) == (3, 4)
    assert s.finish_reason == "stop" and s.server_url == "http://s" and s.text == "z=)"
    assert (s.prompt_index, s.sample_index, s.prompt_ids) == (7, 1, [4, 5, 13])


def test_default_label_maps_through_aliases_and_old_servers_fall_back_to_weight_version():
    obj = copy.deepcopy(LIVE)
    obj["meta_info"]["weight_versions"] = [{"version": "default", "start": 0, "end": 4}]
    assert parse(obj, version_aliases={"default": 0}).weight_versions == [0, 0, 0, 0]
    with pytest.raises(ServerResponseError, match=r"weight_versions\[0\]\.version='default'.*--weight-version"):
        parse(obj)
    del obj["meta_info"]["weight_versions"]  # SGLang < 0.5.20
    assert parse(obj).weight_versions == [4, 4, 4, 4]


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda o: o.pop("output_ids"), r"response\.output_ids is missing"),
        (lambda o: o["meta_info"].pop("output_token_logprobs"), r"meta_info\.output_token_logprobs is missing.*return_logprob"),
        (lambda o: o["meta_info"]["output_token_logprobs"].pop(), r"output_token_logprobs has 3 entries but output_ids has 4"),
        (lambda o: o["meta_info"]["output_token_logprobs"].__setitem__(1, [-1.0, 99, None]), r"output_token_logprobs\[1\]\[1\]=99 differs"),
        (lambda o: o["meta_info"]["output_token_logprobs"].__setitem__(2, [0.7, 19, None]), r"output_token_logprobs\[2\]\[0\]=0.7 is not a log-probability"),
        (lambda o: o["meta_info"]["weight_versions"].__setitem__(1, {"version": "4", "start": 2, "end": 4}), r"weight_versions\[1\] = \[2, 4\) does not continue"),
        (lambda o: o["meta_info"]["weight_versions"].pop(), r"weight_versions cover 1 tokens but the output has 4"),
        (lambda o: o["meta_info"].__setitem__("finish_reason", {"type": "weird"}), r"finish_reason\.type='weird'"),
        (lambda o: o["meta_info"].__setitem__("finish_reason", None), r"finish_reason has type NoneType"),
    ],
)
def test_malformed_answers_name_the_field(mutate, field):
    obj = copy.deepcopy(LIVE)
    mutate(obj)
    with pytest.raises(ServerResponseError, match=field):
        parse(obj)


def test_sampling_params_validation_and_json():
    assert SamplingParams(temperature=0.7, stop_token_ids=(2,), n=4, seed=3).to_json() == {
        "temperature": 0.7, "top_p": 1.0, "top_k": -1, "max_new_tokens": 16, "ignore_eos": False, "n": 4,
        "stop_token_ids": [2], "sampling_seed": 3,
    }  # fmt: skip
    for bad, field in [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(n=0), r"\.n="),
        (dict(stop_token_ids=(-1,)), "stop_token_ids"),
    ]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad).validate()


def test_sample_group_version_range():
    a = parse(LIVE)
    b = copy.deepcopy(a)
    b.weight_versions, b.sample_index = [5, 5, 5, 5], 2
    g = SampleGroup([a, b])
    assert (g.prompt_index, g.min_version, g.max_version, len(g)) == (7, 3, 5, 2) and g[1] is b
