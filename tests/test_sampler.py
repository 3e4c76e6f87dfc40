"""Sampler: each filter on hand-made distributions, penalties, min_new_tokens, seeds, logprobs."""

import math

import pytest
import torch

from engine.errors import InvalidRequest
from engine.request import Request, SamplingParams, StoppingParams
from engine.sampler import new_state, sample
from tests.helpers import make_engine, run_engine

PROBS = [0.5, 0.3, 0.15, 0.05]


def request(params=SamplingParams(), prompt=(7,), output=(), min_new=0, eos=(3,), stop_ids=()):
    r = Request("r", list(prompt), params, StoppingParams(16, min_new, stop_token_ids=stop_ids), eos_token_ids=eos)
    r.token_ids += list(output)
    return r


def frequencies(params, n=4000, seed=0):
    logits = torch.tensor([PROBS]).log().repeat(n, 1)
    reqs = [request(params)] * n
    state = new_state(seed, torch.device("cpu"))
    tokens, _ = sample(logits, reqs, [state] * n)
    return torch.bincount(torch.tensor(tokens), minlength=4).float() / n


def test_temperature_one_follows_the_distribution():
    freq = frequencies(SamplingParams(temperature=1.0))
    assert torch.allclose(freq, torch.tensor(PROBS), atol=0.03), freq


def test_top_k_top_p_min_p_cut_the_tail():
    assert frequencies(SamplingParams(temperature=1.0, top_k=2))[2:].sum() == 0
    assert frequencies(SamplingParams(temperature=1.0, top_p=0.7))[2:].sum() == 0  # 0.5 + 0.3 reach 0.7
    assert frequencies(SamplingParams(temperature=1.0, top_p=0.9))[3] == 0
    assert frequencies(SamplingParams(temperature=1.0, min_p=0.5))[2:].sum() == 0  # p >= 0.25 only
    kept = frequencies(SamplingParams(temperature=1.0, top_k=3, min_p=0.2))
    assert kept[3] == 0 and kept[2] > 0  # 0.15 >= 0.2 * 0.5 survives min_p


def test_low_temperature_and_tiny_top_p_are_greedy():
    for params in (SamplingParams(temperature=0.01), SamplingParams(temperature=1.0, top_p=1e-6),
                   SamplingParams(temperature=1.5, top_k=1)):
        assert frequencies(params, n=200)[0] == 1.0


def test_denormal_temperature_is_greedy_not_nan():
    """Found by the descriptor fuzz: logits / 1.4e-45 overflow to inf and the draw failed; such temperatures are
    greedy, as 0 is."""
    for temperature in (1.4e-45, 1e-30, 9e-6):
        assert SamplingParams(temperature=temperature).greedy
        assert frequencies(SamplingParams(temperature=temperature), n=50)[0] == 1.0
    assert not SamplingParams(temperature=1e-5).greedy


def test_penalties():
    from engine.sampler import _apply_penalties

    row = torch.tensor([2.0, -2.0, 1.0, 0.5])
    _apply_penalties(row, request(SamplingParams(repetition_penalty=4.0), prompt=(0,), output=(1,)))
    assert row.tolist() == [0.5, -8.0, 1.0, 0.5]  # HF: seen positive logits divided, negative multiplied
    row = torch.tensor([2.0, -2.0, 1.0, 0.5])
    _apply_penalties(row, request(SamplingParams(frequency_penalty=1.0, presence_penalty=0.5), prompt=(2,),
                                  output=(0, 0, 3)))
    assert row.tolist() == [2.0 - 2.0 - 0.5, -2.0, 1.0, 0.5 - 1.0 - 0.5]  # output tokens only, not the prompt


def test_min_new_tokens_suppresses_eos_and_stop_tokens():
    logits = torch.tensor([[0.0, 0.0, 0.0, 9.0, 8.0]])
    early = request(min_new=2, output=(0,), stop_ids=(4,))
    assert sample(logits, [early], [new_state(0, torch.device("cpu"))])[0] == [0]
    late = request(min_new=1, output=(0,), stop_ids=(4,))
    assert sample(logits, [late], [new_state(0, torch.device("cpu"))])[0] == [3]


def test_logprobs_describe_the_raw_distribution():
    logits = torch.tensor([PROBS]).log() + 3.0
    params = SamplingParams(temperature=0.5, top_k=1, logprobs=True, top_logprobs=3)
    tokens, logprobs = sample(logits, [request(params)], [new_state(0, torch.device("cpu"))])
    (lp,) = logprobs
    assert tokens == [0] and lp.token_id == 0
    assert math.isclose(lp.logprob, math.log(0.5), rel_tol=1e-5)
    assert [t for t, _ in lp.top] == [0, 1, 2]
    assert math.isclose(lp.top[1][1], math.log(0.3), rel_tol=1e-5)


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0),
                                         ("top_p", 1.5), ("top_k", -1), ("min_p", 2.0), ("repetition_penalty", 0.0),
                                         ("frequency_penalty", 3.0), ("top_logprobs", 21)])
def test_bad_parameters_name_their_field(field, value):
    with pytest.raises(InvalidRequest, match=f"sampling.{field}|{field}"):
        SamplingParams(**{field: value})


def test_seeded_sampling_is_independent_of_the_batch(tiny_llama):
    engine = make_engine(tiny_llama)
    needle = {"needle": [5, 6, 7, 8, 9]}
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    alone = run_engine(engine, needle, 24, sampling={"needle": params})
    fillers = {f"f{i}": [100 + i] * (3 + 7 * i) for i in range(6)}
    noisy = {f: SamplingParams(temperature=1.0, seed=i) for i, f in enumerate(fillers)} | {"needle": params}
    busy = run_engine(engine, fillers | needle, 24, sampling=noisy, arrive_at={"needle": 3})
    assert busy["needle"] == alone["needle"]
    other = run_engine(engine, needle, 24, sampling={"needle": SamplingParams(temperature=0.9, top_p=0.95, seed=99)})
    assert other["needle"] != alone["needle"]
