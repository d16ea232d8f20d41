"""Hard-negative batches (`mmgem.data.sampling`): whole groups per batch, one index once per epoch, the same order on
every rank and after a resume, through accelerate's batch sharding and through `train`."""

from __future__ import annotations

from collections import Counter

import pytest
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

from mmgem.data.records import load_jsonl_records
from mmgem.data.sampling import HardNegativeSampler, record_groups
from mmgem.synthetic import COLOURS, colour_group

pytestmark = pytest.mark.fast

# 9 + 6 + 5 + 1 records: groups of 4 leave remainders 1, 2, 1, 1 (five indices: one mixed block of 4 and one of 1).
GROUPS = ["a"] * 9 + ["b"] * 6 + ["c"] * 5 + ["d"]


def _blocks(order, size):
    return [order[start : start + size] for start in range(0, len(order), size)]


def test_every_index_once_in_whole_blocks_with_the_short_block_last():
    sampler = HardNegativeSampler(GROUPS, batch_size=8, group_size=4, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(len(GROUPS))) and len(sampler) == len(GROUPS)
    blocks = _blocks(order, 4)
    same_group = [b for b in blocks if len({GROUPS[i] for i in b}) == 1 and len(b) == 4]
    # Every group gives len // 4 whole blocks of its own: a 2, b 1, c 1.
    assert Counter(GROUPS[b[0]] for b in same_group) >= Counter({"a": 2, "b": 1, "c": 1})
    assert len(blocks[-1]) == 1 and all(len(b) == 4 for b in blocks[:-1])


def test_the_order_is_a_function_of_seed_and_epoch():
    first, again = HardNegativeSampler(GROUPS, 8, 4, seed=1), HardNegativeSampler(GROUPS, 8, 4, seed=1)
    assert list(first) == list(again) == list(first)
    first.set_epoch(1)
    assert list(first) != list(again)
    again.set_epoch(1)
    assert list(first) == list(again)
    assert list(HardNegativeSampler(GROUPS, 8, 4, seed=2)) != list(again)


def test_two_ranks_get_whole_batches_of_the_single_process_order():
    sampler = HardNegativeSampler(GROUPS, batch_size=4, group_size=4, seed=0)
    single = list(BatchSampler(sampler, batch_size=4, drop_last=False))
    shards = [
        list(BatchSamplerShard(BatchSampler(sampler, 4, False), num_processes=2, process_index=rank))
        for rank in range(2)
    ]
    # accelerate hands batch k to rank k % 2 (and pads the last round from the start): each rank sees whole blocks.
    for k, batch in enumerate(single[:-1]):
        assert shards[k % 2][k // 2] == batch


@pytest.mark.parametrize(
    ("options", "message"),
    [(dict(group_size=1), "`hard_negative_group_size` must be an int >= 2"), (dict(batch_size=6), "multiple of")],
)
def test_bad_settings_name_the_argument(options, message):
    with pytest.raises(ValueError, match=message):
        HardNegativeSampler(GROUPS, **{"batch_size": 8, "group_size": 4, **options})


def test_records_without_the_field_are_named(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "white").save(tmp_path / "a.png")
    lines = ['{"image": "a.png", "caption": "x", "group": 1}', '{"image": "a.png", "caption": "y"}']
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    records = load_jsonl_records(tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match=r"`hard_negative_field` 'group': 1 of 2 records .*lines \[2\]"):
        record_groups(records, "group")
    assert record_groups(records[:1], "group") == [1]


@pytest.fixture(scope="module")
def single_object_data(tmp_path_factory):
    from mmgem.synthetic import generate_dataset

    folder = tmp_path_factory.mktemp("data") / "singles"
    return generate_dataset(folder, 40, 2, 2, image_size=32, seed=5, max_objects=1, num_heldout_pairs=0, progress=False)


def test_synthetic_records_carry_their_colour_group(single_object_data):
    from mmgem.synthetic import generate_dataset

    multi = generate_dataset(
        single_object_data["root"].parent / "multi", 6, 0, 0, image_size=48, seed=1, progress=False
    )
    for record in load_jsonl_records(multi["train"]) + load_jsonl_records(single_object_data["train"]):
        expected = " ".join(sorted(o["colour"] for o in record.metadata["objects"]))
        assert record.metadata["colour_group"] == expected


def test_training_batches_hold_whole_colour_groups(single_object_data, tmp_path, monkeypatch):
    from mmgem.data import collator
    from mmgem.training.train import train

    seen = []
    original = collator.MMGEMCollator.__call__

    def spy(self, items):
        seen.append([colour_group_of(item["caption"]) for item in items])
        return original(self, items)

    monkeypatch.setattr(collator.MMGEMCollator, "__call__", spy)
    records = load_jsonl_records(single_object_data["train"])
    groups = Counter(r.metadata["colour_group"] for r in records)
    train(
        from_scratch="tiny",
        data=str(single_object_data["train"]),
        output_dir=str(tmp_path / "out"),
        max_steps=10,
        per_device_train_batch_size=4,
        hard_negative_field="colour_group",
        hard_negative_group_size=2,
        logging_steps=5,
        save_strategy="no",
        disable_tqdm=True,
    )
    assert len(seen) == 10 and sorted(sum(seen, [])) == sorted(r.metadata["colour_group"] for r in records)
    pairs = [batch[start : start + 2] for batch in seen for start in (0, 2)]
    same = Counter(pair[0] for pair in pairs if pair[0] == pair[1])
    # At least every group's whole pairs are pairs of one colour (a mixed pair can match by chance, never less).
    assert all(same[group] >= count // 2 for group, count in groups.items())
    assert sum(same.values()) >= sum(count // 2 for count in groups.values()) > 10


def colour_group_of(caption: str) -> str:
    return " ".join(sorted(word for word in caption.replace(",", " ").split() if word in COLOURS))


def test_colour_group_helper_matches_the_captions():
    from mmgem.synthetic import SceneObject

    objects = [SceneObject("star", "red", "small", (0, 0, 4, 4)), SceneObject("cross", "blue", "large", (5, 5, 9, 9))]
    assert colour_group(objects) == "blue red" == colour_group_of("a small red star and a large blue cross")


def test_train_rejects_bad_hard_negative_options(single_object_data, tmp_path):
    from mmgem.training.train import train

    common = dict(
        from_scratch="tiny",
        data=str(single_object_data["train"]),
        output_dir=str(tmp_path / "o"),
        max_steps=1,
        disable_tqdm=True,
    )
    with pytest.raises(ValueError, match="multiple of `hard_negative_group_size`"):
        train(hard_negative_field="colour_group", hard_negative_group_size=3, per_device_train_batch_size=4, **common)
    with pytest.raises(ValueError, match="`hard_negative_field` 'shape_group'"):
        train(hard_negative_field="shape_group", per_device_train_batch_size=4, **common)
    assert not (tmp_path / "o" / "model.safetensors").exists()
