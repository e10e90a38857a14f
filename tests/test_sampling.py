"""Token choice: greedy is argmax, a seeded generator repeats its draws, draws follow the softmax
of logits / temperature, and top-k / top-p never let a token outside their set through."""

import pytest
import torch

from owq.server.runtime.sampling import (
    RowSampling,
    draw,
    filter_logits,
    make_generator,
    sample_row,
)

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, float("-inf"), 1.5])


def frequencies(params: RowSampling, n: int = 40000, seed: int = 0) -> torch.Tensor:
    gen = make_generator(seed)
    counts = torch.zeros(LOGITS.numel())
    for _ in range(n):
        counts[sample_row(LOGITS, params, gen)] += 1
    return counts / n


def test_same_seed_same_draws_other_seed_other_draws():
    p = RowSampling(temperature=1.0)
    runs = [[sample_row(LOGITS, p, g) for _ in range(50)] for g in map(make_generator, (1, 1, 2))]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_draws_follow_the_tempered_softmax():
    for temperature in (1.0, 0.5):
        freq = frequencies(RowSampling(temperature=temperature))
        expected = torch.softmax(LOGITS / temperature, -1)
        assert float((freq - expected).abs().max()) < 0.01  # 40k draws: 3 sigma is ~0.007
        assert freq[6] == 0  # probability 0 (logit -inf) is never drawn


def test_top_k_and_top_p_keep_to_their_sets():
    freq = frequencies(RowSampling(temperature=1.0, top_k=2), n=4000)
    assert set(torch.nonzero(freq).flatten().tolist()) == {0, 7}
    probs = torch.softmax(LOGITS, -1)
    kept = filter_logits(LOGITS, 0, 0.6)
    order = torch.argsort(probs, descending=True).tolist()
    assert torch.isfinite(kept).nonzero().flatten().tolist() == sorted(order[:2])  # 0.40 + 0.24
    freq = frequencies(RowSampling(temperature=1.0, top_p=0.6), n=4000)
    assert set(torch.nonzero(freq).flatten().tolist()) == {0, 7}


def test_draw_edges():
    gen = make_generator(0)
    one_hot = torch.zeros(5)
    one_hot[3] = 1.0
    assert {draw(one_hot, gen) for _ in range(100)} == {3}
    leading_zero = torch.tensor([0.0, 0.5, 0.5])
    assert 0 not in {draw(leading_zero, gen) for _ in range(200)}


def test_no_distribution_is_an_error_not_a_token():
    gen = make_generator(0)
    for bad in (torch.zeros(4), torch.tensor([0.5, float("nan"), 0.5])):
        with pytest.raises(ValueError, match="cannot sample"):
            draw(bad, gen)
