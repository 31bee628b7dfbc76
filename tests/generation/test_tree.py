"""DraftTree: structure, derived buffers (mask, positions, paths) and validation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nimblelm.cache import TreeSpec
from nimblelm.errors import GenerationError
from nimblelm.generation.speculative.tree import DraftTree


@st.composite
def trees(draw, max_nodes: int = 24, vocab: int = 50):
    n = draw(st.integers(1, max_nodes))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    tokens = draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n))
    return DraftTree(tokens, parents)


def brute_ancestors(parents: list[int], i: int) -> set[int]:
    out = {i}
    while parents[i] >= 0:
        i = parents[i]
        out.add(i)
    return out


@settings(max_examples=150, deadline=None)
@given(trees(), st.integers(0, 1000))
def test_tree_buffers_properties(tree, prefix_len):
    n, parents = len(tree), tree.parents.tolist()
    mask = tree.ancestor_mask
    assert mask.shape == (n, n) and mask.dtype == torch.bool
    for i in range(n):
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == brute_ancestors(parents, i)
    assert bool(mask[:, 0].all())
    assert torch.equal(tree.positions(prefix_len), mask.sum(-1) - 1 + prefix_len)
    assert torch.equal(tree.depth, mask.sum(-1) - 1)
    # one path per leaf, each ending at its leaf, every node on some path
    leaves = [i for i in range(n) if i not in parents]
    assert list(tree.leaves) == leaves
    assert [p[-1] for p in tree.paths] == leaves
    assert set().union(*map(set, tree.paths)) == set(range(n))
    for path in tree.paths:
        assert path[0] == 0
        assert all(parents[b] == a for a, b in zip(path, path[1:]))
        assert set(path) == brute_ancestors(parents, path[-1])
    # children lists agree with parents; the model-side spec agrees with ours
    for i, kids in enumerate(tree.children):
        assert list(kids) == [j for j in range(n) if parents[j] == i]
    spec = tree.to_spec()
    assert isinstance(spec, TreeSpec)
    assert torch.equal(spec.ancestor_mask, mask) and torch.equal(spec.depth, tree.depth)
    assert tree.is_chain == all(len(k) <= 1 for k in tree.children)


def test_chain_constructor():
    q = torch.full((4, 6), 1 / 6, dtype=torch.float64)
    tree = DraftTree.chain([5, 1, 2, 3], child_probs=q)
    assert tree.parents.tolist() == [-1, 0, 1, 2]
    assert tree.is_chain and tree.paths == ((0, 1, 2, 3),)
    assert tree.positions(10).tolist() == [10, 11, 12, 13]
    assert torch.equal(tree.ancestor_mask, torch.ones(4, 4, dtype=torch.bool).tril())
    assert tree.children_sampled_without_replacement is False
    single = DraftTree.chain([7])
    assert single.paths == ((0,),) and single.leaves == (0,) and len(single) == 1


def test_path_to_and_repr():
    tree = DraftTree([9, 1, 2, 3, 4], [-1, 0, 0, 1, 1])
    assert tree.path_to(4) == (0, 1, 4) and tree.path_to(0) == (0,)
    assert tree.children == ((1, 2), (3, 4), (), (), ())
    assert "deterministic" in repr(tree)


@pytest.mark.parametrize("tokens, parents, message", [
    ([], [], "at least its root"),
    ([1, 2], [-1], "one parent per node"),
    ([1, 2], [0, 0], "must have parent -1"),
    ([1, 2, 3], [-1, 2, 0], "node 1 has parent 2"),
    ([1, 2, 3], [-1, 0, -1], "node 2 has parent -1"),
    ([1, -2], [-1, 0], "non-negative"),
    ([[1, 2]], [[-1, 0]], "1-D"),
    ([1.0, 2.0], [-1, 0], "integers"),
])
def test_invalid_topology_raises(tokens, parents, message):
    with pytest.raises(GenerationError, match=message):
        DraftTree(torch.tensor(tokens) if tokens else torch.tensor([], dtype=torch.long), parents)


def test_invalid_child_probs_raise():
    with pytest.raises(ValueError, match=r"\[n, V\] = \[3, V\]"):
        DraftTree([1, 2, 3], [-1, 0, 1], child_probs=torch.rand(2, 5))
    with pytest.raises(ValueError, match="out of range"):
        DraftTree([1, 2, 7], [-1, 0, 1], child_probs=torch.rand(3, 5))
    with pytest.raises(ValueError, match="floating-point"):
        DraftTree([1, 2, 3], [-1, 0, 1], child_probs=torch.ones(3, 5, dtype=torch.long))
    # sampled siblings must say how they were drawn
    with pytest.raises(ValueError, match="children_sampled_without_replacement"):
        DraftTree([1, 2, 3], [-1, 0, 0], child_probs=torch.rand(3, 5))
    tree = DraftTree([1, 2, 3], [-1, 0, 0], child_probs=torch.rand(3, 5), children_sampled_without_replacement=True)
    assert tree.children_sampled_without_replacement and "without replacement" in repr(tree)
