"""Tests for se_ray.entropy: clustering, entropy estimators, labels and early-stop bounds."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from se_ray.entropy import (
    cluster_counts,
    discrete_semantic_entropy,
    entropy_bounds,
    exact_entropy,
    greedy_rounds,
    label_is_decided,
    label_with_threshold,
    logsumexp,
    normalize_answer,
    regular_semantic_entropy,
    semantic_ids,
)

# ---------------------------------------------------------------------------- helpers


def integer_partitions(n: int, largest: int | None = None) -> Iterator[tuple[int, ...]]:
    """Partitions of n as non-increasing tuples."""
    largest = n if largest is None else largest
    if n == 0:
        yield ()
        return
    for first in range(min(n, largest), 0, -1):
        for rest in integer_partitions(n - first, first):
            yield (first, *rest)


def hand_entropy(sizes: tuple[int, ...] | list[int]) -> float:
    m = sum(sizes)
    return -sum(s / m * math.log(s / m) for s in sizes)


def ids_from_sizes(sizes: tuple[int, ...] | list[int]) -> list[int]:
    return [k for k, s in enumerate(sizes) for _ in range(s)]


def reference_get_semantic_ids(n: int, equivalent: Callable[[int, int], bool]) -> list[int]:
    """A literal transcription of jlko/semantic_uncertainty ``get_semantic_ids``."""
    semantic_set_ids = [-1] * n
    next_id = 0
    for i in range(n):
        if semantic_set_ids[i] == -1:
            semantic_set_ids[i] = next_id
            for j in range(i + 1, n):
                if equivalent(i, j):
                    semantic_set_ids[j] = next_id
            next_id += 1
    return semantic_set_ids


def same_partition(a: list[int], b: list[int]) -> bool:
    return all((a[i] == a[j]) == (b[i] == b[j]) for i in range(len(a)) for j in range(len(a)))


def continuations(counts: tuple[int, ...], remaining: int) -> Iterator[list[int]]:
    """Every final class-size vector: each later sample joins an existing class or opens a new one."""
    if remaining == 0:
        yield list(counts)
        return
    for k in range(len(counts)):
        grown = list(counts)
        grown[k] += 1
        yield from continuations(tuple(grown), remaining - 1)
    yield from continuations((*counts, 1), remaining - 1)


# ---------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  an   apple, a day! ", "apple day"),
        ("Theatre", "theatre"),
        ("I don't know.", "i dont know"),
        ("A", ""),
        ("", ""),
        ("Hello\tWorld\n", "hello world"),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


# ---------------------------------------------------------------------------- discrete SE


PARTITIONS_OF_10 = list(integer_partitions(10))


def test_there_are_42_partitions_of_10() -> None:
    assert len(PARTITIONS_OF_10) == 42
    assert len(set(PARTITIONS_OF_10)) == 42


@pytest.mark.parametrize("sizes", PARTITIONS_OF_10, ids=lambda s: "/".join(map(str, s)))
def test_discrete_se_matches_hand_value_for_every_partition_of_10(sizes: tuple[int, ...]) -> None:
    ids = ids_from_sizes(sizes)
    assert discrete_semantic_entropy(ids) == pytest.approx(hand_entropy(sizes), abs=1e-12)


def test_partitions_of_10_give_39_distinct_values() -> None:
    values = {round(discrete_semantic_entropy(ids_from_sizes(s)), 12) for s in PARTITIONS_OF_10}
    assert len(values) == 39
    assert min(values) == 0.0
    assert max(values) == round(math.log(10), 12)


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ((10,), 0.0),
        ((9, 1), 0.325),
        ((8, 2), 0.500),
        ((7, 3), 0.611),
        ((8, 1, 1), 0.639),
        ((6, 4), 0.673),
        ((5, 5), 0.693),
        ((7, 2, 1), 0.802),
        ((6, 2, 2), 0.950),
        ((5, 3, 2), 1.030),
        ((4, 3, 3), 1.089),
        ((2,) * 5, 1.609),
        ((2,) + (1,) * 8, 2.164),
        ((1,) * 10, 2.303),
    ],
)
def test_research_table_of_m10_levels(sizes: tuple[int, ...], expected: float) -> None:
    assert round(discrete_semantic_entropy(ids_from_sizes(sizes)), 3) == pytest.approx(expected, abs=1e-9)


def test_all_distinct_is_ln_m() -> None:
    assert discrete_semantic_entropy(list(range(10))) == pytest.approx(math.log(10), abs=1e-15)


def test_single_sample_and_single_class_give_zero() -> None:
    assert discrete_semantic_entropy([0]) == 0.0
    assert discrete_semantic_entropy([3] * 7) == 0.0
    assert math.copysign(1.0, discrete_semantic_entropy([0] * 5)) == 1.0  # not -0.0


def test_discrete_se_of_empty_input_raises() -> None:
    with pytest.raises(ValueError):
        discrete_semantic_entropy([])


def test_ties_give_identical_floats() -> None:
    # Same partition, different label order and interleaving: bit-identical entropies.
    a = discrete_semantic_entropy([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    b = discrete_semantic_entropy([3, 1, 0, 3, 1, 0, 2, 3, 0, 3])
    c = discrete_semantic_entropy([7, 7, 7, 7, 5, 5, 5, 9, 9, 4])
    assert a == b == c


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(st.integers(0, 6), min_size=1, max_size=12),
    perm=st.permutations(list(range(7))),
    order=st.randoms(use_true_random=False),
)
def test_discrete_se_invariant_to_relabelling_and_order(
    ids: list[int], perm: list[int], order: random.Random
) -> None:
    base = discrete_semantic_entropy(ids)
    relabelled = [perm[i] * 10 + 3 for i in ids]
    shuffled = list(relabelled)
    order.shuffle(shuffled)
    assert discrete_semantic_entropy(relabelled) == base
    assert discrete_semantic_entropy(shuffled) == base
    assert base == pytest.approx(hand_entropy(list(Counter(ids).values())), abs=1e-12)


def test_cluster_counts() -> None:
    assert cluster_counts([]) == []
    assert cluster_counts([0, 1, 0, 2, 1, 0]) == [3, 2, 1]
    assert sorted(cluster_counts([5, 5, 9])) == [1, 2]


# ---------------------------------------------------------------------------- logsumexp


def test_logsumexp() -> None:
    assert logsumexp([0.0, 0.0]) == pytest.approx(math.log(2))
    assert logsumexp([-1e4, -1e4]) == pytest.approx(-1e4 + math.log(2))
    assert logsumexp([-1e4]) == -1e4
    assert logsumexp([1000.0, 1000.0]) == pytest.approx(1000 + math.log(2))
    assert logsumexp([-math.inf, -3.0]) == -3.0
    assert logsumexp([-math.inf, -math.inf]) == -math.inf
    assert logsumexp([]) == -math.inf


# ---------------------------------------------------------------------------- regular SE


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, 5), min_size=1, max_size=12), lp=st.floats(-50, 0))
def test_regular_se_with_equal_logprobs_equals_discrete(ids: list[int], lp: float) -> None:
    assert regular_semantic_entropy(ids, [lp] * len(ids)) == pytest.approx(
        discrete_semantic_entropy(ids), abs=1e-12
    )


def test_regular_se_hand_derived_two_clusters() -> None:
    # Class A: two samples of likelihood e^-1, class B: one of e^-2.
    ids = [0, 0, 1]
    lps = [-1.0, -1.0, -2.0]
    pa = 2 * math.exp(-1) / (2 * math.exp(-1) + math.exp(-2))
    pb = 1 - pa
    expected = -(pa * math.log(pa) + pb * math.log(pb))
    assert regular_semantic_entropy(ids, lps) == pytest.approx(expected, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(0, 4), st.floats(-30, 0)), min_size=1, max_size=10),
    shift=st.floats(-1000, 1000),
)
def test_regular_se_invariant_to_constant_shift(data: list[tuple[int, float]], shift: float) -> None:
    ids = [d[0] for d in data]
    lps = [d[1] for d in data]
    base = regular_semantic_entropy(ids, lps)
    assert regular_semantic_entropy(ids, [v + shift for v in lps]) == pytest.approx(base, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(data=st.lists(st.tuples(st.integers(0, 4), st.floats(-100, 0)), min_size=1, max_size=10))
def test_regular_se_is_a_valid_entropy(data: list[tuple[int, float]]) -> None:
    ids = [d[0] for d in data]
    lps = [d[1] for d in data]
    h = regular_semantic_entropy(ids, lps)
    assert 0.0 <= h <= math.log(len(set(ids))) + 1e-12


def test_regular_se_stable_for_large_negative_values() -> None:
    ids = [0, 0, 1, 2]
    lps = [-1e4, -1e4, -1e4 - 1.0, -1e4 - 2.0]
    h = regular_semantic_entropy(ids, lps)
    expected = regular_semantic_entropy(ids, [0.0, 0.0, -1.0, -2.0])
    assert math.isfinite(h)
    assert h == pytest.approx(expected, abs=1e-9)
    assert regular_semantic_entropy([0, 1], [-1e4, -1e4]) == pytest.approx(math.log(2))


def test_regular_se_with_minus_inf_logprobs() -> None:
    h = regular_semantic_entropy([0, 1, 1], [-math.inf, -1.0, -1.0])
    assert h == 0.0  # the -inf sample carries no mass, the other class takes it all
    h = regular_semantic_entropy([0, 0, 1, 2], [-1.0, -math.inf, -1.0, -math.inf])
    assert h == pytest.approx(math.log(2))
    assert not math.isnan(h)


def test_regular_se_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        regular_semantic_entropy([], [])
    with pytest.raises(ValueError):
        regular_semantic_entropy([0, 1], [-1.0])
    with pytest.raises(ValueError):
        regular_semantic_entropy([0, 1], [-math.inf, -math.inf])
    with pytest.raises(ValueError):
        regular_semantic_entropy([0, 1], [math.nan, -1.0])
    with pytest.raises(ValueError):
        regular_semantic_entropy([0, 1], [math.inf, -1.0])


def test_regular_se_single_class_is_zero_not_negative() -> None:
    h = regular_semantic_entropy([0] * 7, [-0.3, -1.7, -2.2, -0.01, -5.0, -0.9, -3.3])
    assert h == 0.0
    assert math.copysign(1.0, h) == 1.0


# ---------------------------------------------------------------------------- greedy clustering


def drive(n: int, judge: Callable[[int, int], bool]) -> tuple[list[int], list[list[tuple[int, int]]]]:
    """Run greedy_rounds by hand and record the rounds it yields."""
    rounds = greedy_rounds(n)
    seen: list[list[tuple[int, int]]] = []
    try:
        pairs = next(rounds)
        while True:
            seen.append(pairs)
            pairs = rounds.send([judge(i, j) for i, j in pairs])
    except StopIteration as stop:
        return stop.value, seen


def test_greedy_rounds_trivial_sizes_do_not_yield() -> None:
    assert drive(0, lambda i, j: True) == ([], [])
    assert drive(1, lambda i, j: True) == ([0], [])
    with pytest.raises(ValueError):
        greedy_rounds(-1)


def test_greedy_rounds_yields_one_openers_pairs() -> None:
    ids, rounds = drive(4, lambda i, j: False)
    assert ids == [0, 1, 2, 3]
    assert rounds == [[(0, 1), (0, 2), (0, 3)], [(1, 2), (1, 3)], [(2, 3)]]
    ids, rounds = drive(4, lambda i, j: True)
    assert ids == [0, 0, 0, 0]
    assert rounds == [[(0, 1), (0, 2), (0, 3)]]


def test_greedy_rounds_rejects_wrong_number_of_verdicts() -> None:
    rounds = greedy_rounds(3)
    next(rounds)
    with pytest.raises(ValueError):
        rounds.send([True])


def test_greedy_rounds_lockstep_across_questions() -> None:
    # Several questions driven together, one batch of judge calls per step.
    judges = [lambda i, j: False, lambda i, j: True, lambda i, j: (i + j) % 2 == 0]
    sizes = [5, 6, 7]
    gens = [greedy_rounds(n) for n in sizes]
    results: dict[int, list[int]] = {}
    pending: dict[int, list[tuple[int, int]]] = {}
    for q, g in enumerate(gens):
        try:
            pending[q] = next(g)
        except StopIteration as stop:
            results[q] = stop.value
    while pending:
        verdicts = {q: [judges[q](i, j) for i, j in pairs] for q, pairs in pending.items()}
        for q in list(pending):
            try:
                pending[q] = gens[q].send(verdicts[q])
            except StopIteration as stop:
                results[q] = stop.value
                del pending[q]
    for q, n in enumerate(sizes):
        assert results[q] == reference_get_semantic_ids(n, judges[q])


def test_relabelling_quirk_lets_a_later_opener_steal_a_member() -> None:
    # Opener 0 claims 2 but not 1; 1 then opens class 1, also claims 2 and overwrites its id.
    matrix = {(0, 2): True, (1, 2): True}
    ids = semantic_ids(3, lambda i, j: matrix.get((i, j), False))
    assert ids == [0, 1, 1]
    assert ids == reference_get_semantic_ids(3, lambda i, j: matrix.get((i, j), False))
    # An order-respecting "first match wins" rule would have kept 2 in class 0.
    assert ids != [0, 1, 0]


def test_equivalence_relation_gives_its_true_partition() -> None:
    labels = ["a", "b", "a", "c", "b", "a", "d", "c", "a", "b"]
    ids = semantic_ids(len(labels), lambda i, j: labels[i] == labels[j])
    assert same_partition(ids, [ord(x) for x in labels])
    assert ids == [0, 1, 0, 2, 1, 0, 3, 2, 0, 1]  # numbered in order of opening


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 9).flatmap(
        lambda n: st.tuples(st.just(n), st.lists(st.booleans(), min_size=n * n, max_size=n * n))
    )
)
def test_greedy_matches_reference_on_random_judges(case: tuple[int, list[bool]]) -> None:
    n, flat = case

    def judge(i: int, j: int) -> bool:  # asymmetric, not transitive
        return flat[i * n + j]

    ids = semantic_ids(n, judge)
    assert ids == reference_get_semantic_ids(n, judge)
    assert ids == drive(n, judge)[0]
    if n:
        # Ids are exactly 0..K-1, first appearances in increasing order.
        firsts = list(dict.fromkeys(ids))
        assert sorted(firsts) == list(range(max(ids) + 1))
        assert firsts == sorted(firsts)


def _string_judge(flat: list[bool]) -> Callable[[int, int], bool]:
    """A symmetric, deterministic judge on "strings" 0..5 that finds identical strings equivalent."""

    def same(a: int, b: int) -> bool:
        return a == b or flat[min(a, b) * 6 + max(a, b)]

    return same


def _dedup_then_expand(strings: list[int], same: Callable[[int, int], bool]) -> list[int]:
    unique = list(dict.fromkeys(strings))
    unique_ids = semantic_ids(len(unique), lambda i, j: same(unique[i], unique[j]))
    return [unique_ids[unique.index(s)] for s in strings]


@settings(max_examples=300, deadline=None)
@given(
    strings=st.lists(st.integers(0, 5), min_size=0, max_size=10),
    flat=st.lists(st.booleans(), min_size=36, max_size=36),
)
def test_memoised_verdicts_reproduce_full_clustering(strings: list[int], flat: list[bool]) -> None:
    # De-duplicating the judge CALLS is exact: ask each unordered pair of distinct strings
    # once, call identical strings equivalent without asking, and drive all M answers.
    same = _string_judge(flat)
    asked: dict[tuple[int, int], bool] = {}

    def cached(i: int, j: int) -> bool:
        a, b = strings[i], strings[j]
        if a == b:
            return True
        key = (min(a, b), max(a, b))
        if key not in asked:
            asked[key] = same(a, b)
        return asked[key]

    full = semantic_ids(len(strings), lambda i, j: same(strings[i], strings[j]))
    assert semantic_ids(len(strings), cached) == full
    u = len(set(strings))
    assert len(asked) <= u * (u - 1) // 2


@settings(max_examples=300, deadline=None)
@given(
    strings=st.lists(st.integers(0, 5), min_size=0, max_size=10),
    classes=st.lists(st.integers(0, 2), min_size=6, max_size=6),
)
def test_deduplicated_answers_expand_to_full_clustering_for_transitive_judges(
    strings: list[int], classes: list[int]
) -> None:
    def same(a: int, b: int) -> bool:
        return classes[a] == classes[b]

    full = semantic_ids(len(strings), lambda i, j: same(strings[i], strings[j]))
    assert _dedup_then_expand(strings, same) == full


def test_deduplicated_answers_diverge_under_the_quirk_with_a_non_transitive_judge() -> None:
    # "A" ~ "B" and "B" ~ "C" but not "A" ~ "C" (symmetric, deterministic, A ~ A). On all
    # four answers A B C B, opener A takes both copies of B; C then opens class 1 and steals
    # the second B only. Clustering the unique strings A B C keeps every B with A. So
    # de-duplicating the answers (rather than the judge calls) departs from the reference.
    pairs = {frozenset("AB"), frozenset("BC")}

    def same(a: str, b: str) -> bool:
        return a == b or frozenset((a, b)) in pairs

    strings = ["A", "B", "C", "B"]
    full = semantic_ids(4, lambda i, j: same(strings[i], strings[j]))
    assert full == reference_get_semantic_ids(4, lambda i, j: same(strings[i], strings[j]))
    assert full == [0, 0, 1, 1]
    unique = ["A", "B", "C"]
    unique_ids = semantic_ids(3, lambda i, j: same(unique[i], unique[j]))
    assert [unique_ids[unique.index(s)] for s in strings] == [0, 0, 1, 0]


# ---------------------------------------------------------------------------- exact entropy, labels


def test_exact_entropy() -> None:
    assert exact_entropy(["Paris", " Paris ", "Paris\n"]) == 0.0
    assert exact_entropy(["Paris", "paris"]) == pytest.approx(math.log(2))
    assert exact_entropy(["a", "b", "a", "c"]) == pytest.approx(hand_entropy([2, 1, 1]))
    assert exact_entropy(["x"]) == 0.0
    with pytest.raises(ValueError):
        exact_entropy([])


def test_label_with_threshold() -> None:
    assert label_with_threshold(0.5, 0.25) is True
    assert label_with_threshold(0.25, 0.5) is False
    assert label_with_threshold(0.5, 0.5) is False  # equality answers
    level = discrete_semantic_entropy([0, 0, 1, 1])
    assert label_with_threshold(level, math.log(2)) is (level > math.log(2))


# ---------------------------------------------------------------------------- bounds


def test_entropy_bounds_simple() -> None:
    assert entropy_bounds([10], 0) == (0.0, 0.0)
    low, high = entropy_bounds([1], 9)
    assert low == 0.0
    assert high == pytest.approx(math.log(10))
    low, high = entropy_bounds([3, 1], 2)
    assert low == pytest.approx(hand_entropy([5, 1]))
    assert high == pytest.approx(hand_entropy([3, 1, 1, 1]))
    assert entropy_bounds([], 4) == (0.0, pytest.approx(math.log(4)))


def test_entropy_bounds_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        entropy_bounds([], 0)
    with pytest.raises(ValueError):
        entropy_bounds([2, 0], 1)
    with pytest.raises(ValueError):
        entropy_bounds([2], -1)


def _bound_cases() -> Iterator[tuple[tuple[int, ...], int]]:
    for total in range(1, 9):
        for k in range(0, min(6, total) + 1):
            for prefix in integer_partitions(k):
                yield prefix, total - k


BOUND_CASES = [c for c in _bound_cases() if sum(c[0]) + c[1] > 0]


def test_entropy_bounds_are_tight_and_cover_every_continuation() -> None:
    checked = 0
    for prefix, remaining in BOUND_CASES:
        low, high = entropy_bounds(list(prefix), remaining)
        finals = [discrete_semantic_entropy(ids_from_sizes(c)) for c in continuations(prefix, remaining)]
        assert min(finals) == low, (prefix, remaining)
        assert max(finals) == high, (prefix, remaining)
        checked += len(finals)
    assert checked > 1000


def _attainable_levels(max_m: int) -> list[float]:
    return sorted(
        {
            discrete_semantic_entropy(ids_from_sizes(p))
            for m in range(1, max_m + 1)
            for p in integer_partitions(m)
        }
    )


TAUS = sorted({*_attainable_levels(8), 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, -0.1})


def test_label_is_decided_agrees_with_every_continuation() -> None:
    decided = {True: 0, False: 0, None: 0}
    for prefix, remaining in BOUND_CASES:
        finals = [discrete_semantic_entropy(ids_from_sizes(c)) for c in continuations(prefix, remaining)]
        for tau in TAUS:
            verdict = label_is_decided(list(prefix), remaining, tau)
            labels = {label_with_threshold(h, tau) for h in finals}
            decided[verdict] += 1
            if verdict is None:
                # Open only when both labels really are still reachable (bounds are tight).
                assert labels == {True, False}, (prefix, remaining, tau)
            else:
                assert labels == {verdict}, (prefix, remaining, tau)
    assert all(decided.values())


def test_label_is_decided_with_no_remaining_is_the_label() -> None:
    for sizes in PARTITIONS_OF_10:
        h = discrete_semantic_entropy(ids_from_sizes(sizes))
        for tau in (0.25, h, 2.25):
            assert label_is_decided(list(sizes), 0, tau) is label_with_threshold(h, tau)


def test_label_is_decided_examples() -> None:
    # 6 agreeing samples out of 10: at most 6/1/1/1/1 -> 1.23; at tau 1.25 "answer" is certain.
    assert label_is_decided([6], 4, 1.25) is False
    assert label_is_decided([6], 4, 1.0) is None
    # 5 distinct answers out of 10: at least 6/1/1/1/1 -> 1.23 > 1.0, abstain whatever comes.
    assert label_is_decided([1] * 5, 5, 1.0) is True


def test_bounds_agree_with_greedy_prefix_stability() -> None:
    # The prefix's ids are fixed by prefix pairs alone: clustering the first k answers gives
    # the same ids as the first k of the full clustering, for any judge.
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 9)
        matrix = [[rng.random() < 0.4 for _ in range(n)] for _ in range(n)]
        full = semantic_ids(n, lambda i, j, m=matrix: m[i][j])
        for k in range(n + 1):
            prefix = semantic_ids(k, lambda i, j, m=matrix: m[i][j])
            assert full[:k] == prefix
            counts = cluster_counts(prefix)
            if counts or n - k:
                low, high = entropy_bounds(counts, n - k)
                assert low <= discrete_semantic_entropy(full) <= high


def test_continuation_enumeration_counts() -> None:
    # Sanity check of the test helper: from nothing, continuations of r samples are the
    # set partitions of r in canonical form, counted by the Bell numbers.
    bell = [1, 1, 2, 5, 15, 52, 203]
    for r in range(1, 7):
        assert sum(1 for _ in continuations((), r)) == bell[r]
    assert list(itertools.islice(continuations((2,), 1), 3)) == [[3], [2, 1]]
