"""Tests for llm_gym.algorithms.plumbing.kv_cache: the preallocated decoding cache."""

from __future__ import annotations

import pytest
import torch
from grpo_tiny import EOS, make_model, prompt, single_thread
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from llm_gym.algorithms.plumbing import kv_cache
from llm_gym.algorithms.plumbing.kv_cache import PreallocatedLayer, _moves, preallocate
from llm_gym.algorithms.rollout.completions import left_pad
from llm_gym.algorithms.rollout.decoding import decode

_one_thread = pytest.fixture(autouse=True)(single_thread)


def _kv(rows: int, positions: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, positions, 4, generator=gen), torch.randn(rows, 2, positions, 4, generator=gen)


def _twins(rows: int = 3, positions: int = 5, capacity: int = 8) -> tuple[DynamicLayer, PreallocatedLayer]:
    keys, values = _kv(rows, positions, 0)
    plain = DynamicLayer()
    plain.update(keys, values)
    return plain, PreallocatedLayer(keys, values, capacity)


def test_updates_write_in_place_and_match_concatenation():
    plain, layer = _twins()
    buffer = layer._keys.data_ptr()
    for step in range(3):  # 5 + 3 = 8 positions: exactly the capacity
        k, v = _kv(3, 1, step + 1)
        want = plain.update(k, v)
        got = layer.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert layer._keys.data_ptr() == buffer  # never reallocated
    assert layer.keys.data_ptr() == buffer  # the model reads a view of the buffer
    assert layer.get_seq_length() == plain.get_seq_length() == 8
    assert layer.get_mask_sizes(1) == plain.get_mask_sizes(1) == (9, 0)


def test_update_past_capacity_grows_the_buffer():
    plain, layer = _twins(capacity=6)
    k, v = _kv(3, 4, 7)  # 5 + 4 = 9 > 6
    want, got = plain.update(k, v), layer.update(k, v)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert layer._keys.shape[-2] == 18  # doubled to twice the needed length


def test_row_selection_repetition_and_crop_match_dynamic_layer():
    plain, layer = _twins(rows=4)
    index = torch.tensor([3, 1])
    plain.batch_select_indices(index)
    layer.batch_select_indices(index)
    assert torch.equal(layer.keys, plain.keys) and torch.equal(layer.values, plain.values)
    plain.batch_repeat_interleave(3)
    layer.batch_repeat_interleave(3)
    assert torch.equal(layer.keys, plain.keys) and layer.keys.shape[0] == 6
    plain.crop(-2)
    layer.crop(-2)
    assert torch.equal(layer.keys, plain.keys) and layer.get_seq_length() == 3
    k, v = _kv(6, 1, 9)  # writing after a crop overwrites the forgotten positions
    assert torch.equal(layer.update(k, v)[0], plain.update(k, v)[0])
    with pytest.raises(ValueError, match="crop takes a negative number of positions to remove, got 1"):
        layer.crop(1)


@pytest.mark.parametrize("keep", [[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [0, 2, 3, 5], [0, 1, 2, 3, 4], [4], [0, 1, 2], [2, 3, 4, 5], [0, 3, 4, 5]])
def test_dropping_rows_compacts_in_place_like_dynamic_layer(keep, monkeypatch):
    monkeypatch.setattr(kv_cache, "MIN_MOVE_BYTES", 0)  # these rows are tiny: move them in place anyway
    plain, layer = _twins(rows=6, positions=5, capacity=9)
    buffer = layer._keys.data_ptr()
    index = torch.tensor(keep)
    plain.batch_select_indices(index)
    layer.batch_select_indices(index)
    assert torch.equal(layer.keys, plain.keys) and torch.equal(layer.values, plain.values)
    assert layer.keys.shape == (len(keep), 2, 5, 4) and layer._keys.shape[2] == 9
    assert layer._keys.data_ptr() == buffer  # no new buffer: the rows moved within it
    for step in range(3):  # later steps (and a second drop) still match the concatenating cache
        k, v = _kv(len(keep), 1, 10 + step)
        out, ref = layer.update(k, v), plain.update(k, v)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    if len(keep) > 1:
        again = torch.tensor([0, len(keep) - 1])
        plain.batch_select_indices(again)
        layer.batch_select_indices(again)
        assert torch.equal(layer.keys, plain.keys) and torch.equal(layer.values, plain.values)


def test_small_rows_are_copied_whole_and_large_rows_moved_in_place():
    # one row of 2 heads x 5 positions x 4 fp32 = 160 bytes: far below MIN_MOVE_BYTES, copied whole
    plain, layer = _twins(rows=6, positions=5, capacity=9)
    buffer = layer._keys.data_ptr()
    plain.batch_select_indices(torch.tensor([0, 2, 3]))
    layer.batch_select_indices(torch.tensor([0, 2, 3]))
    assert torch.equal(layer.keys, plain.keys) and layer._keys.data_ptr() != buffer
    # 2 heads x 4 positions x 2048 fp32 = 64 KiB per row: exactly MIN_MOVE_BYTES, moved in place
    keys = torch.randn(4, 2, 4, 2048)
    layer = PreallocatedLayer(keys, -keys, 6)
    buffer = layer._keys.data_ptr()
    layer.batch_select_indices(torch.tensor([1, 3]))
    assert layer._keys.data_ptr() == buffer
    assert torch.equal(layer.keys, keys[[1, 3]]) and torch.equal(layer.values, -keys[[1, 3]])


def test_moves_shift_each_run_down_in_chunks_no_longer_than_the_shift():
    assert _moves([0, 1, 2]) == []  # nothing dropped before a kept row: nothing moves
    assert _moves([0, 2, 3, 5]) == [(1, 2, 1), (2, 3, 1), (3, 4, 2)]
    assert _moves([1, 2, 3]) == [(0, 1, 1), (1, 2, 1), (2, 3, 1)]
    assert _moves([2, 3, 4, 5, 6]) == [(0, 2, 2), (2, 4, 2), (4, 5, 2)]


@pytest.mark.parametrize("index", [[1, 0], [0, 0, 1], [2, 3, 4, 5, 6, 7, 8], [-1, 2]])
def test_other_row_selections_copy(index):
    """Reordered, repeated or out-of-range rows are not a drop: they go through plain indexing."""
    plain, layer = _twins(rows=6, positions=5, capacity=9)
    if max(index) >= 6:
        with pytest.raises(IndexError):
            layer.batch_select_indices(torch.tensor(index))
        return
    plain.batch_select_indices(torch.tensor(index))
    layer.batch_select_indices(torch.tensor(index))
    assert torch.equal(layer.keys, plain.keys) and torch.equal(layer.values, plain.values)


def test_preallocate_swaps_every_filled_layer_of_a_prefilled_cache():
    model = make_model()
    cache = DynamicCache(config=model.config)
    assert not preallocate(cache, 10)  # nothing filled yet: left alone
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    keys = [layer.keys.clone() for layer in cache.layers]
    assert preallocate(cache, 10)
    assert all(isinstance(layer, PreallocatedLayer) for layer in cache.layers)
    assert all(torch.equal(layer.keys, k) for layer, k in zip(cache.layers, keys, strict=True))
    assert cache.get_seq_length() == 3


@pytest.mark.parametrize("greedy", [True, False])
def test_decoding_with_the_preallocated_cache_gives_the_same_tokens(greedy):
    model = make_model(init_std=0.3)
    ids, attention, _ = left_pad([prompt([5, 6, 7, 8, 9]), prompt([8, 9]), prompt([10, 3, 4])], EOS)
    eos = list(range(0, 100, 9))  # some rows stop early, so rows also leave the batch mid-run
    out = {}
    for prealloc in (False, True):
        with torch.no_grad():
            out[prealloc] = decode(
                model, ids, attention, group_size=4, max_new_tokens=24, eos_token_ids=eos, pad_token_id=EOS,
                greedy=greedy, preallocate_cache=prealloc, generator=torch.Generator().manual_seed(0),
            )  # fmt: skip
    assert torch.equal(out[True], out[False])
    assert out[True].shape[1] > 8 and (out[True] == EOS).any()  # long enough, and some rows finished early
