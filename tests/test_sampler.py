"""Sampler: each filter on hand-made distributions, penalties, min_new_tokens, seeds, logprobs; one row's failure
stays its own."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import InvalidRequest, RequestFailed
from engine.request import Request, SamplingParams, StoppingParams
from engine.sampler import _usable, new_state, sample
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
    tokens = sample(logits, reqs, [state] * n).tokens
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
    assert sample(logits, [early], [new_state(0, torch.device("cpu"))]).tokens == [0]
    late = request(min_new=1, output=(0,), stop_ids=(4,))
    assert sample(logits, [late], [new_state(0, torch.device("cpu"))]).tokens == [3]


def test_logprobs_describe_the_raw_distribution():
    logits = torch.tensor([PROBS]).log() + 3.0
    params = SamplingParams(temperature=0.5, top_k=1, logprobs=True, top_logprobs=3)
    result = sample(logits, [request(params)], [new_state(0, torch.device("cpu"))])
    tokens, (lp,) = result.tokens, result.logprobs
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


# ---- one row never fails the batch --------------------------------------------------------------
CPU = torch.device("cpu")


def test_stop_id_outside_the_logits_cannot_fail_the_batch():
    """Found over gRPC: a stop id past the vocabulary with min_new_tokens >= 1 raised IndexError in the stop
    suppression and failed every request of the step. Admission refuses such ids; the sampler skips them anyway."""
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0, 0.5]] * 2)
    hostile = request(min_new=1, stop_ids=(10**6,), eos=(2,))
    result = sample(logits, [hostile, request()], [new_state(0, CPU), new_state(1, CPU)])
    assert result.tokens == [3, 2] and not result.errors  # EOS (2) suppressed for the first row only


def test_non_finite_logits_fail_their_row_only():
    logits = torch.tensor([PROBS, PROBS, PROBS]).log()
    logits[1] = float("nan")
    rows = [request(SamplingParams(temperature=1.0, seed=3)), request(), request(SamplingParams(temperature=0.7))]
    result = sample(logits, rows, [new_state(i, CPU) for i in range(3)])
    assert set(result.errors) == {1} and type(result.errors[1]) is RequestFailed  # the model's fault: INTERNAL
    assert result.tokens[1] is None and all(isinstance(t, int) for t in (result.tokens[0], result.tokens[2]))


def test_parameters_that_break_the_distribution_fail_as_invalid_argument():
    """Finite but extreme logits: an in-range penalty pushes a seen token to +inf. That request alone fails, as its
    parameters' fault (INVALID_ARGUMENT); the bystander sampled from the same logits keeps its token."""
    logits = torch.tensor([[1e38, -1.0, 0.0, 2.0]] * 2)
    penalised = request(SamplingParams(temperature=0.8, repetition_penalty=0.01), prompt=(0,))
    result = sample(logits, [penalised, request()], [new_state(0, CPU), new_state(1, CPU)])
    assert set(result.errors) == {0} and isinstance(result.errors[0], InvalidRequest)
    assert result.errors[0].field == "sampling" and result.tokens == [None, 0]


def test_top_k_and_top_logprobs_beyond_the_vocabulary():
    logits = torch.tensor([PROBS]).log()
    params = SamplingParams(temperature=1.0, top_k=2**31 - 1, logprobs=True, top_logprobs=20)
    result = sample(logits, [request(params)], [new_state(0, CPU)])
    assert not result.errors and len(result.logprobs[0].top) == 4


def test_repetition_penalty_has_a_finite_range():
    for value in (1e-40, 1e-33, 0.009, 101.0, float("inf")):
        with pytest.raises(InvalidRequest, match="sampling.repetition_penalty"):
            SamplingParams(repetition_penalty=value)
    for value in (0.01, 0.009999999776482582, 100.0):  # the second: 0.01 as a float32 field carries it
        assert SamplingParams(repetition_penalty=value).has_penalties


def sampling_params():
    return st.builds(
        SamplingParams,
        temperature=st.one_of(st.just(0.0), st.floats(1e-5, 2.0), st.sampled_from([1e-5, 1.5e-5, 2.0])),
        top_p=st.one_of(st.just(1.0), st.floats(1e-38, 1.0, exclude_min=False).filter(lambda p: p > 0)),
        top_k=st.one_of(st.just(0), st.integers(1, 2**31 - 1)),
        min_p=st.floats(0.0, 1.0),
        repetition_penalty=st.one_of(st.just(1.0), st.floats(0.01, 100.0)),
        frequency_penalty=st.floats(-2.0, 2.0), presence_penalty=st.floats(-2.0, 2.0),
        seed=st.integers(0, 2**63 - 1), logprobs=st.booleans(), top_logprobs=st.integers(0, 20))


def stopping_params(vocab: int):
    return st.integers(1, 6).flatmap(lambda max_new: st.builds(
        StoppingParams, max_new_tokens=st.just(max_new), min_new_tokens=st.integers(0, max_new),
        stop=st.lists(st.text(min_size=1, max_size=8), max_size=16).map(tuple),
        stop_token_ids=st.lists(st.integers(0, vocab - 1), max_size=16).map(tuple), ignore_eos=st.booleans()))


@settings(max_examples=300, deadline=None)
@given(params=st.lists(st.tuples(sampling_params(), stopping_params(64)), min_size=1, max_size=6),
       scale=st.sampled_from([1.0, 30.0, 1e4]), seed=st.integers(0, 2**16))
def test_valid_parameters_never_fail_a_bystander(params, scale, seed):
    """Random, individually valid sampling and stopping parameters beside a greedy bystander: sample() never raises,
    the bystander gets its argmax, and with logits of a sane size no valid request fails at all."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(params) + 1, 64, generator=generator) * scale
    rows = [request(p, prompt=(1, 2, 3), output=(4, 5), eos=(7,)) for p, _ in params]
    for row, (_, stopping) in zip(rows, params):
        row.stopping = stopping
    result = sample(logits, [*rows, request()], [new_state(i, CPU) for i in range(len(params) + 1)])
    assert result.tokens[-1] == int(logits[-1].argmax()) and len(result.errors) == 0


def test_a_failing_request_costs_the_others_nothing_in_that_step(tiny_llama):
    """The engine: a request whose logits turn NaN (fault point sample.nonfinite) or whose post-processing raises
    (output.raise) ends alone with its error, and its step still gives every other request its token."""
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.faults import FaultPlan
    from tests.helpers import TEST_DEVICE

    solo = run_engine(make_engine(tiny_llama), {"bystander": [5, 6, 7, 8]}, 6)["bystander"]
    plan = FaultPlan({"sample.nonfinite": {"request": "nan"}, "output.raise": {"request": "raise"}}, testing=True)
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), num_kv_blocks=64, kv_mode="dense", device=TEST_DEVICE),
                       plan)
    for rid, prompt in (("bystander", [5, 6, 7, 8]), ("nan", [9, 10]), ("raise", [11, 12, 13])):
        engine.add_request(engine.new_request(rid, prompt, SamplingParams(), StoppingParams(6)))
    first = {out.request_id: out for out in engine.step()}
    assert type(first["nan"].error) is RequestFailed and type(first["raise"].error) is RequestFailed
    assert first["bystander"].error is None and len(first["bystander"].token_ids) == 1  # same step, its token
    tokens = list(first["bystander"].token_ids)
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == "bystander" and out.error is None
            tokens += out.token_ids
    assert tokens == solo and engine.scheduler.blocks.num_free == 64
    assert plan.fired == {"sample.nonfinite": 1, "output.raise": 1}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, -1.5, 3.0, 1e38, -1e38, math.inf, -math.inf, math.nan]), min_size=1,
                         max_size=6), min_size=1, max_size=5).filter(lambda rows: len({len(r) for r in rows}) == 1))
def test_a_row_is_usable_exactly_when_it_has_no_nan_no_plus_inf_and_a_finite_logit(rows):
    """The one-pass test (the value at argmax is finite) against the definition, element by element."""
    expected = [not any(math.isnan(x) or x == math.inf for x in row) and any(math.isfinite(x) for x in row)
                for row in rows]
    assert _usable(torch.tensor(rows)) == expected
