"""Word-problem generators against brute-force permutation-matrix products, and the CLI."""

import itertools
import math

import numpy as np
import pytest

from train.state_tracking import groups, tasks


def permutation_matrix(p):
    """P[i, p[i]] = 1, so that P_a @ P_b is "apply a, then b"."""
    m = np.zeros((len(p), len(p)), np.int64)
    m[np.arange(len(p)), p] = 1
    return m


def brute_force_prefix_products(group, tokens):
    """Running products by multiplying permutation matrices left to right."""
    mats = [permutation_matrix(p) for p in group.elements]
    out = np.empty(tokens.shape, np.int64)
    for b in range(tokens.shape[0]):
        acc = np.eye(group.degree, dtype=np.int64)
        for t in range(tokens.shape[1]):
            acc = acc @ mats[tokens[b, t]]
            matches = [e for e, m in enumerate(mats) if np.array_equal(m, acc)]
            assert len(matches) == 1, "a product must be exactly one element of the group"
            out[b, t] = matches[0]
    return out


CUSTOM_GENERATORS = [[1, 2, 0, 3, 4, 5], [0, 1, 2, 4, 5, 3], [3, 4, 5, 0, 1, 2]]  # (Z3 x Z3) ⋊ Z2


@pytest.mark.parametrize("make, order", [
    (lambda: groups.group_by_name("S3"), 6),
    (lambda: groups.group_by_name("S5"), 120),
    (lambda: groups.from_generators(CUSTOM_GENERATORS, name="custom"), 18),
    (lambda: groups.group_by_name("Z7"), 7),
    (lambda: groups.group_by_name("D5"), 10),
])
def test_word_problem_targets_match_matrix_products(make, order):
    group = make()
    assert group.order == order
    assert np.array_equal(group.elements[0], np.arange(group.degree))
    assert len({tuple(p) for p in group.elements}) == order  # no duplicates
    rng = np.random.default_rng(order)
    batch = tasks.sample_word_problems(group, rng, batch_size=3, length=11)
    assert batch.tokens.shape == batch.targets.shape == batch.mask.shape == (3, 11)
    assert batch.tokens.dtype == batch.targets.dtype == np.int32
    np.testing.assert_array_equal(batch.targets, brute_force_prefix_products(group, batch.tokens))
    np.testing.assert_array_equal(batch.mask, 1.0)


@pytest.mark.parametrize("n", [3, 5])
def test_symmetric_group_holds_every_permutation(n):
    group = groups.symmetric(n)
    assert {tuple(p) for p in group.elements} == set(itertools.permutations(range(n)))
    assert group.order == math.factorial(n)


def test_group_families_have_the_documented_orders_and_structure():
    assert groups.group_by_name("A5").order == 60
    assert groups.group_by_name("D4").order == 8
    z6 = groups.group_by_name("Z6")
    assert np.array_equal(z6.table, z6.table.T)  # cyclic: abelian
    d4 = groups.group_by_name("D4")
    assert not np.array_equal(d4.table, d4.table.T)  # dihedral n >= 3: not abelian
    for group in (groups.group_by_name("S4"), d4, groups.group_by_name("A4")):
        # Latin square: each row and column of a group's Cayley table is a permutation.
        assert all(sorted(row) == list(range(group.order)) for row in group.table)
        assert all(sorted(col) == list(range(group.order)) for col in group.table.T)


def test_uniform_lengths_mask_a_prefix_and_generators_are_seeded():
    group = groups.group_by_name("S3")
    first = tasks.sample_word_problems(group, np.random.default_rng(7), 64, 9, "uniform")
    again = tasks.sample_word_problems(group, np.random.default_rng(7), 64, 9, "uniform")
    other = tasks.sample_word_problems(group, np.random.default_rng(8), 64, 9, "uniform")
    np.testing.assert_array_equal(first.tokens, again.tokens)
    np.testing.assert_array_equal(first.mask, again.mask)
    assert not np.array_equal(first.tokens, other.tokens)
    lengths = first.mask.sum(axis=1)
    assert lengths.min() >= 1 and lengths.max() <= 9 and len(set(lengths)) > 1
    np.testing.assert_array_equal(first.mask, np.arange(9)[None, :] < lengths[:, None])
    evals = tasks.eval_word_problems(group, seed=3, num_sequences=5, length=6)
    np.testing.assert_array_equal(evals.tokens,
                                  tasks.eval_word_problems(group, 3, 5, 6).tokens)


@pytest.mark.parametrize("call, message", [
    (lambda: groups.group_by_name("Q8"), "group must be"),
    (lambda: groups.from_generators([[0, 0, 1]]), "generators must be permutations"),
    (lambda: groups.dihedral(2), "n >= 3"),
    (lambda: tasks.sample_word_problems(groups.cyclic(3), np.random.default_rng(0), 2, 0),
     "length must be"),
    (lambda: tasks.sample_word_problems(groups.cyclic(3), np.random.default_rng(0), 2, 4, "rand"),
     "length_sampling"),
    (lambda: tasks.prefix_products(groups.cyclic(3), np.array([[0, 3]])), "tokens must be"),
])
def test_bad_task_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
