import json
from collections import Counter

import pytest

from rewards.shapes import all_prompts
from rl.data import load_prompt_source, shard


def test_shapes_sources_carry_metadata_and_balance_categories():
    train = load_prompt_source("shapes:train")
    test = load_prompt_source("shapes:test")
    assert len(test) == len(all_prompts("test")) and len(train) == len(all_prompts("train"))
    assert not {p.text for p in train.items} & {p.text for p in test.items}
    batch = train.batch(step=3, n=600, seed=0)
    assert all(p.metadata["prompt"] == p.text and "include" in p.metadata for p in batch)
    counts = Counter(p.metadata["tag"] for p in batch)
    assert len(counts) == 6 and min(counts.values()) > 600 / 6 * 0.7  # category-balanced, not 73% position
    assert [p.text for p in train.batch(3, 8, 0)] == [p.text for p in train.batch(3, 8, 0)]
    assert [p.text for p in train.batch(3, 8, 0)] != [p.text for p in train.batch(4, 8, 0)]


def test_shapes_source_draws_categories_by_weight():
    # weights 4 (position) + 5 x 1 = 9: position 4/9 of the draws, each other category 1/9
    weighted = load_prompt_source("shapes:train", "position=4")
    counts = Counter(p.metadata["tag"] for p in weighted.batch(step=0, n=1800, seed=0))
    assert abs(counts["position"] / 1800 - 4 / 9) < 0.03
    assert all(abs(counts[tag] / 1800 - 1 / 9) < 0.03 for tag in counts if tag != "position")


def test_txt_source_walks_shuffled_passes(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n  a dog \na bird\n")
    source = load_prompt_source(str(path))
    assert [p.text for p in source.items] == ["a cat", "a dog", "a bird"] and source.items[0].metadata == {}
    first_pass = [p.text for step in range(3) for p in source.batch(step, 1, seed=5)]
    assert sorted(first_pass) == ["a bird", "a cat", "a dog"]  # every prompt once per pass
    assert len(source.batch(0, 7, seed=5)) == 7


def test_jsonl_source_keeps_the_line_as_metadata(tmp_path):
    path = tmp_path / "geneval.jsonl"
    lines = [{"tag": "counting", "prompt": "two cats", "include": [{"class": "cat", "count": 2}]}, {"prompt": "x"}]
    path.write_text("\n".join(json.dumps(line) for line in lines))
    source = load_prompt_source(str(path))
    assert source.items[0].text == "two cats" and source.items[0].metadata == lines[0]


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompt_source(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompt_source(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_prompt_source(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="shapes:train"):
        load_prompt_source("shapes:validation")
    with pytest.raises(ValueError, match=".txt or a .jsonl"):
        load_prompt_source("prompts.csv")


def test_a_malformed_jsonl_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a cat"}\n\n{"prompt": "a dog",}\n')  # line 3 (after a blank line) is broken
    with pytest.raises(ValueError, match=r"prompts\.jsonl:3: not valid JSON .*one JSON object such as"):
        load_prompt_source(str(path))


def test_a_byte_order_mark_is_accepted(tmp_path):
    for name, text in (("bom.jsonl", '{"prompt": "a cat"}\n'), ("bom.txt", "a cat\n")):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())  # what Windows editors write first
        assert [p.text for p in load_prompt_source(str(tmp_path / name)).items] == ["a cat"]


def test_a_file_that_is_not_utf8_or_a_folder_is_named(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("a cat\na caf\u00e9 sign\n".encode("latin-1"))  # found by the fault sweep
    with pytest.raises(ValueError, match=r"latin1\.txt:2: not UTF-8 \(byte 0xe9\); save the prompt file as UTF-8"):
        load_prompt_source(str(tmp_path / "latin1.txt"))
    (tmp_path / "prompts.txt").mkdir()
    with pytest.raises(FileNotFoundError, match=r"prompts\.txt is a folder"):
        load_prompt_source(str(tmp_path / "prompts.txt"))


def test_eval_subset_is_evenly_spaced_with_stable_indices():
    source = load_prompt_source("shapes:test")
    subset = source.eval_subset(8)
    assert len(subset) == 8 and subset[0][0] == 0 and subset[-1][0] == len(source) - 1
    assert all(source.items[i] == p for i, p in subset)
    assert len({p.metadata["tag"] for _, p in source.eval_subset(32)}) >= 4  # not just the first category
    assert len(source.eval_subset(0)) == len(source)


def test_sharding_gives_every_prompt_to_exactly_one_process_at_any_count():
    items = list(range(18))
    assert [shard(items, rank, 3) for rank in range(3)] == [items[0:6], items[6:12], items[12:18]]
    for n in (5, 7, 16):
        for processes in (1, 2, 3, 4, 5):
            shards = [shard(list(range(n)), rank, processes) for rank in range(processes)]
            assert sum(shards, []) == list(range(n))  # contiguous, each once, none added
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [shard(list(range(5)), rank, 3) for rank in range(3)] == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="prompts_per_step >= 3"):
        shard(list(range(2)), 0, 3)
