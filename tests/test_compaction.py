"""Compaction ops against hand-computed cases."""
import torch

from prefixkv import compaction as C


def test_keep_counts_round_and_clamp():
    lengths = torch.tensor([10, 3, 100, 1])
    # floor(f*n + 0.5): 0.25*10=2.5 -> 3; 0.25*100 = 25; protected (2 sinks + last) raise small rows
    assert C.keep_counts(lengths, 0.25, sink=2, protect_last=True).tolist() == [3, 3, 25, 1]
    assert C.keep_counts(lengths, 1.0, sink=4, protect_last=True).tolist() == [10, 3, 100, 1]


def test_select_keeps_top_scores_in_original_order_right_aligned():
    scores = torch.tensor([[0.0, 0.0, 5.0, 1.0, 9.0, 2.0, 3.0, 0.5]])
    valid = torch.tensor([[False, False, True, True, True, True, True, True]])
    protected = C.protect(scores, valid, sink=1, protect_last=True)
    # sink = position 2 (first real token), last = position 7; plus the 2 best others: 4 (9.0) and 6 (3.0)
    index, kept = C.select(protected, valid, torch.tensor([4]), 4)
    assert index.tolist() == [[2, 4, 6, 7]]
    assert kept.all()


def test_compact_equals_manual_gather_and_pads_short_rows_in_front():
    torch.manual_seed(0)
    keys, values = torch.randn(2, 2, 6, 3), torch.randn(2, 2, 6, 3)
    scores = torch.tensor([[0.0, 0.0, 0.3, 0.9, 0.1, 0.2], [0.5, 0.1, 0.7, 0.2, 0.6, 0.3]])
    valid = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    k, v, pos, kept = C.compact(keys, values, scores, valid, 0.5, sink=1, protect_last=True)
    # row 0: 4 real tokens -> keep 2 = sink (col 2) and last (col 5)... floor(0.5*4+.5)=2
    # row 1: 6 tokens -> keep 3 = sink (0), last (5), best other: col 2 (0.7)
    assert kept.tolist() == [[False, True, True], [True, True, True]]
    assert pos.tolist() == [[-1, 0, 3], [0, 2, 5]]
    assert torch.equal(k[1], keys[1][:, [0, 2, 5]])
    assert torch.equal(v[0, :, 1:], values[0][:, [2, 5]])


def test_decode_rule_step_by_step():
    """Prompt of 100 tokens at keep 0.2: 20 entries; cap grows as round(0.2 x seen); evict slot 20-5=15."""
    fraction, sink, distance = 0.2, 2, 5
    keys = torch.arange(20.0).view(1, 1, 20, 1)
    positions = torch.tensor([[0, 1] + list(range(82, 100))])  # sinks + 18 kept prompt tokens
    valid = torch.ones(1, 20, dtype=torch.bool)
    prompt = torch.tensor([100])
    state = (keys, keys.clone(), positions, valid)
    for step in range(1, 11):
        seen = torch.tensor([100 + step])
        cap, slot = C.decode_budget(prompt, seen, fraction, sink, True, distance)
        assert slot.item() == 15
        assert cap.item() == max(20, int(0.2 * (100 + step) + 0.5))
        new = torch.full((1, 1, 1, 1), 100.0 + step)
        state = C.append_and_evict(*state, new, new, torch.tensor([[99 + step]]), cap, slot)
        assert state[3].sum().item() == cap.item()
        assert state[0].shape[2] == cap.item()  # batch of one: no empty slots
    # 10 steps: cap went 20 -> 22 (at seen 103 and 108), so 8 evictions, all at rank 15:
    # the compacted prompt's first 15 entries stay, then the most recent tokens (new ones are 100..109)
    pos = state[2][0].tolist()
    assert pos[:15] == [0, 1] + list(range(82, 95))
    assert pos[15:] == list(range(103, 110))


def test_decode_budget_for_every_layer_at_once_is_each_layers_own():
    """(batch, 1) lengths and (layers,) fractions give each layer's numbers in one call (the
    engine graph computes them so); hand-computed for one row, per-layer calls for the rest."""
    fractions = [0.2, 0.5, 0.05, 1.0]
    prompt, seen = torch.tensor([100, 7, 300]), torch.tensor([103, 30, 301])
    cap, slot = C.decode_budget(prompt[:, None], seen[:, None], torch.tensor(fractions), 2, True, 5)
    assert cap.shape == slot.shape == (3, 4)
    # row 0: prompt keeps 20 / 50 / 5 / 100, seen 103 keeps 21 / 52 / 5 / 103; slot 15 / 45 / 2 (a sink floor) / 95
    assert cap[0].tolist() == [21, 52, 5, 103] and slot[0].tolist() == [15, 45, 2, 95]
    for l, f in enumerate(fractions):
        one_cap, one_slot = C.decode_budget(prompt, seen, f, 2, True, 5)
        assert cap[:, l].tolist() == one_cap.tolist() and slot[:, l].tolist() == one_slot.tolist()
    # evict_in_place takes a layer's column as it is, (batch, 1)
    positions = torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13]])
    pos, _ = C.evict_in_place(positions, positions >= 0, torch.tensor([[3], [4]]), torch.tensor([[1], [1]]))
    assert pos.tolist() == [[0, -1, 2, 3], [10, 11, 12, 13]]


def test_evict_in_a_batch_leaves_empty_slot_only_in_the_evicting_row():
    keys = torch.arange(8.0).view(2, 1, 4, 1)
    positions = torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13]])
    valid = positions >= 0
    k, v, pos, val = C.evict(keys, keys.clone(), positions, valid, torch.tensor([3, 4]), torch.tensor([1, 1]))
    assert pos.tolist() == [[-1, 0, 2, 3], [10, 11, 12, 13]]
    # once every row has an empty front slot, the column is dropped
    k, v, pos, val = C.evict(k, v, pos, val, torch.tensor([3, 3]), torch.tensor([1, 1]))
    assert pos.tolist() == [[0, 2, 3], [10, 12, 13]]
    assert k[0, 0, :, 0].tolist() == [0.0, 2.0, 3.0] and k[1, 0, :, 0].tolist() == [4.0, 6.0, 7.0]


def test_evict_in_place_marks_the_slot_the_shifting_evict_removes():
    # hand-computed: rank 1 of row 0 (position 1) goes; row 1 is within its cap of 4
    positions = torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13]])
    pos, val = C.evict_in_place(positions, positions >= 0, torch.tensor([3, 4]), torch.tensor([1, 1]))
    assert pos.tolist() == [[0, -1, 2, 3], [10, 11, 12, 13]]
    # the next eviction of row 0 skips the empty slot: rank 1 is now position 2
    pos, val = C.evict_in_place(pos, val, torch.tensor([2, 4]), torch.tensor([1, 1]))
    assert pos.tolist() == [[0, -1, -1, 3], [10, 11, 12, 13]]


def test_evict_in_place_keeps_what_evict_keeps_over_many_steps():
    """Both forms of the decode-phase rule, fed the same appends, hold the same entries."""
    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([[-1, -1, 0, 3, 5, 7], [0, 1, 2, 4, 6, 8]])
    valid = positions >= 0
    keys = torch.randn(2, 1, 6, 2, generator=g)
    moved = (keys, keys.clone(), positions, valid)
    fixed = (positions, valid)
    for step in range(12):
        new_pos = torch.tensor([[9 + step], [9 + step]])
        new_key = torch.randn(2, 1, 1, 2, generator=g)
        cap = torch.tensor([5, 6]) + step // 4
        slot = torch.tensor([2, 3])
        moved = C.evict(*C.append(*moved, new_key, new_key, new_pos), cap, slot)
        appended = (torch.cat([fixed[0], new_pos], -1), torch.cat([fixed[1], torch.ones(2, 1, dtype=torch.bool)], -1))
        fixed = C.evict_in_place(*appended, cap, slot)
        for row in range(2):
            assert moved[2][row][moved[3][row]].tolist() == fixed[0][row][fixed[1][row]].tolist(), (step, row)


def test_every_layer_at_once_evicts_what_each_layer_evicts_alone():
    """``evict_in_place_layers`` over layers laid side by side equals ``evict_in_place`` per
    layer: hand-computed for two layers, then random layers with empty slots, several rows,
    some over their caps, over many steps."""
    # layer 0 [0, 1, 2] over its cap 2: rank 1 goes; layer 1 [5, 6] within its cap 2
    positions = torch.tensor([[0, 1, 2, 5, 6]])
    pos, val = C.evict_in_place_layers(positions, positions >= 0, torch.tensor([3, 2]),
                                       torch.tensor([[2, 2]]), torch.tensor([[1, 0]]))
    assert pos.tolist() == [[0, -1, 2, 5, 6]] and val.tolist() == [[True, False, True, True, True]]
    assert C.segments(torch.tensor([3, 1, 2]), torch.ones(6)).tolist() == [0, 0, 0, 1, 2, 2]
    g = torch.Generator().manual_seed(1)
    widths = [5, 1, 9, 3]
    layers = []
    for w in widths:
        valid = torch.rand(3, w, generator=g) > 0.3
        layers.append((torch.where(valid, torch.arange(w).expand(3, w), -1), valid))
    evicted = 0
    for step in range(10):
        cap = torch.randint(0, 8, (3, len(widths)), generator=g)
        slot = torch.randint(0, 4, (3, len(widths)), generator=g)
        alone = [C.evict_in_place(p, v, cap[:, l], slot[:, l]) for l, (p, v) in enumerate(layers)]
        pos, val = C.evict_in_place_layers(torch.cat([p for p, _ in layers], -1), torch.cat([v for _, v in layers], -1),
                                           torch.tensor(widths), cap, slot)
        assert torch.equal(pos, torch.cat([p for p, _ in alone], -1)), step
        assert torch.equal(val, torch.cat([v for _, v in alone], -1)), step
        evicted += sum(int(v0.sum() - v.sum()) for (_, v), (_, v0) in zip(alone, layers))
        layers = alone
    assert evicted > 5  # the caps did bite
