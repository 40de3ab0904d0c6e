"""Data: packing into rows with segment ids, the loss mask, seeded shuffling, resume position,
file splits and readers. Checked against straightforward Python loops on random documents."""

import collections
import math
import types

import numpy as np
import pytest

from m2rnn_jax.typed_config import ConfigError
from train import data


def random_documents(rng, count=9, max_len=40, vocab=256):
    return [rng.integers(0, vocab, rng.integers(1, max_len)).astype(np.uint8)
            for _ in range(count)]


def stream_reference(documents, order):
    """Token stream and per-position document number, built one token at a time."""
    tokens, doc_of = [], []
    for rank, i in enumerate(order):
        for t in documents[i]:
            tokens.append(int(t))
            doc_of.append(rank)
    return tokens, doc_of


def test_packed_rows_match_a_token_by_token_reference():
    rng = np.random.default_rng(11)
    documents = random_documents(rng)
    seq_len = 7
    rows = data.PackedRows(documents, seq_len, seed=5)
    order = np.random.default_rng(5).permutation(len(documents))
    tokens, doc_of = stream_reference(documents, order)
    assert len(rows) == (len(tokens) - 1) // seq_len
    for i in range(len(rows)):
        row = rows[i]
        window = slice(i * seq_len, i * seq_len + seq_len + 1)
        assert row["tokens"].tolist() == tokens[window]
        # Segment ids number this row's documents from 1, changing exactly at boundaries.
        docs = doc_of[window]
        expected, current = [], 1
        for j, d in enumerate(docs):
            if j and d != docs[j - 1]:
                current += 1
            expected.append(current)
        assert row["segment_ids"].tolist() == expected
    with pytest.raises(IndexError):
        rows[len(rows)]


def test_rows_overlap_by_one_token_so_every_token_is_a_target_once():
    rng = np.random.default_rng(3)
    documents = random_documents(rng, count=5)
    rows = data.PackedRows(documents, 6)
    targets = np.concatenate([rows[i]["tokens"][1:] for i in range(len(rows))])
    stream = np.concatenate(documents)
    np.testing.assert_array_equal(targets, stream[1:1 + targets.size])


def test_loss_mask_skips_document_starts_and_padding():
    rng = np.random.default_rng(0)
    segment_ids = np.sort(rng.integers(0, 4, (3, 12)), axis=1)
    tokens = rng.integers(0, 256, (3, 12))
    inputs, input_segments, targets, mask = data.model_inputs(tokens, segment_ids)
    np.testing.assert_array_equal(inputs, tokens[:, :-1])
    np.testing.assert_array_equal(targets, tokens[:, 1:])
    np.testing.assert_array_equal(input_segments, segment_ids[:, :-1])
    for b in range(3):
        for t in range(11):
            same_doc = segment_ids[b, t] == segment_ids[b, t + 1]
            assert mask[b, t] == (same_doc and segment_ids[b, t + 1] != 0)


def _iterate(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_train_iterator_is_seeded_reshuffles_each_epoch_and_resumes_from_its_state():
    rng = np.random.default_rng(1)
    rows = data.PackedRows(random_documents(rng, count=20), 5, seed=0)
    batch = 3
    epoch_batches = len(rows) // batch
    first = _iterate(data.train_iterator(rows, batch, seed=7), 2 * epoch_batches + 2)
    again = _iterate(data.train_iterator(rows, batch, seed=7), 2 * epoch_batches + 2)
    other = _iterate(data.train_iterator(rows, batch, seed=8), 2)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert any(not np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, other))

    def row_ids(batches):  # identify rows by content
        all_rows = [rows[i]["tokens"].tobytes() for i in range(len(rows))]
        return [all_rows.index(r.tobytes()) for b in batches for r in b["tokens"]]

    seen = row_ids(first)
    epoch0, epoch1 = seen[:len(rows)], seen[len(rows):2 * len(rows)]
    # Each epoch visits every row once, in a different order.
    assert sorted(epoch0) == sorted(epoch1) == list(range(len(rows)))
    assert epoch0 != epoch1

    # Resume: a fresh iterator given the saved position continues identically.
    iterator = data.train_iterator(rows, batch, seed=7)
    _iterate(iterator, 5)
    position = iterator.get_state()
    resumed = data.train_iterator(rows, batch, seed=7)
    resumed.set_state(position)
    for a, b in zip(_iterate(resumed, 4), first[5:9]):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["segment_ids"], b["segment_ids"])


def test_processes_read_disjoint_rows_that_make_up_the_global_batch():
    rng = np.random.default_rng(2)
    rows = data.PackedRows(random_documents(rng, count=20), 5, seed=0)
    parts = [_iterate(data.train_iterator(rows, 4, seed=3, process_index=p, process_count=2), 3)
             for p in range(2)]
    for step in range(3):
        a, b = parts[0][step]["tokens"], parts[1][step]["tokens"]
        assert a.shape == b.shape == (2, 6)
        assert not any(np.array_equal(x, y) for x in a for y in b)


def test_validation_batches_spread_rows_and_pad_with_masked_rows():
    rng = np.random.default_rng(4)
    rows = data.PackedRows(random_documents(rng, count=12), 5)
    batches = data.validation_batches(rows, num_rows=7, batch_size=4)
    assert len(batches) == 2 and batches[0]["tokens"].shape == (4, 6)
    picked = np.concatenate([b["tokens"] for b in batches])[:7]
    expected = np.linspace(0, len(rows) - 1, 7).round().astype(int)
    for got, index in zip(picked, expected):
        np.testing.assert_array_equal(got, rows[int(index)]["tokens"])
    padding = batches[1]["segment_ids"][3]
    assert not padding.any()
    assert not data.model_inputs(batches[1]["tokens"], batches[1]["segment_ids"])[3][3].any()


def test_unigram_bits_equal_the_entropy_of_the_evaluated_targets():
    rng = np.random.default_rng(5)
    rows = data.PackedRows(random_documents(rng, count=6, vocab=5), 8)
    batches = data.validation_batches(rows, 0, 3)
    counts = collections.Counter()
    for b in batches:
        for tokens, segments in zip(b["tokens"], b["segment_ids"]):
            for t in range(len(tokens) - 1):
                if segments[t] == segments[t + 1] and segments[t + 1]:
                    counts[int(tokens[t + 1])] += 1
    total = sum(counts.values())
    entropy = -sum(c / total * math.log2(c / total) for c in counts.values())
    assert data.unigram_bits_per_token(batches) == pytest.approx(entropy, rel=1e-12)


def data_config(**kwargs):
    base = dict(source="text", paths=(), validation_paths=(), validation_fraction=0.25)
    base.update(kwargs)
    return types.SimpleNamespace(**base)


def test_text_folder_is_split_by_file_deterministically(tmp_path):
    texts = {f"f{i:02d}.txt": f"document {i} " * (i + 1) for i in range(8)}
    (tmp_path / "sub").mkdir()
    for name, text in texts.items():
        (tmp_path / ("sub" if name == "f05.txt" else "") / name).write_text(text)
    corpus = data.load_corpus(data_config(paths=(str(tmp_path),)))
    again = data.load_corpus(data_config(paths=(str(tmp_path),)))
    assert len(corpus.validation) == 2 and len(corpus.train) == 6
    every = sorted(d.tobytes() for d in corpus.train + corpus.validation)
    assert every == sorted(t.encode() for t in texts.values())
    assert not {d.tobytes() for d in corpus.train} & {d.tobytes() for d in corpus.validation}
    assert [d.tobytes() for d in again.validation] == [d.tobytes() for d in corpus.validation]
    assert corpus.byte_level


def test_token_files_npy_and_npz(tmp_path):
    rng = np.random.default_rng(6)
    single = rng.integers(0, 1000, 50)
    np.save(tmp_path / "a.npy", single)
    lengths = np.array([3, 0, 10, 7])
    packed = rng.integers(0, 1000, lengths.sum())
    np.savez(tmp_path / "b.npz", tokens=packed, lengths=lengths)
    validation = rng.integers(0, 1000, 20)
    np.save(tmp_path / "v.npy", validation)
    corpus = data.load_corpus(data_config(source="tokens",
                                          paths=(str(tmp_path / "a.npy"), str(tmp_path / "b.npz")),
                                          validation_paths=(str(tmp_path / "v.npy"),)))
    expected = [single] + [d for d in np.split(packed, np.cumsum(lengths)[:-1]) if d.size]
    assert len(corpus.train) == len(expected)
    for got, want in zip(corpus.train, expected):
        np.testing.assert_array_equal(got, want)
    assert not corpus.byte_level and corpus.max_token == max(single.max(), packed.max(),
                                                             validation.max())
    np.save(tmp_path / "bad.npy", rng.normal(size=(4, 2)))
    with pytest.raises(data.DataError, match="1-D integer"):
        data.read_token_documents(tmp_path / "bad.npy")


def test_stdlib_file_list_is_sorted_python_without_site_packages():
    files = data.stdlib_python_files()
    assert len(files) > 100 and files == sorted(files)
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    train, validation = data.split_by_file(files, 0.02)
    assert set(train).isdisjoint(validation) and len(train) + len(validation) == len(files)
    assert 0.01 < len(validation) / len(files) < 0.03


def test_data_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.paths"):
        data.load_corpus(data_config(paths=(str(tmp_path / "missing"),)))
    with pytest.raises(ConfigError, match="data.paths"):
        data.load_corpus(data_config(source="text", paths=()))
    (tmp_path / "one.txt").write_text("only one file")
    with pytest.raises(ConfigError, match="validation_paths"):
        data.load_corpus(data_config(paths=(str(tmp_path / "one.txt"),)))
    rows = data.PackedRows([np.arange(20, dtype=np.uint8)], 4)
    with pytest.raises(ConfigError, match="data.batch_size"):
        data.train_iterator(rows, 64, seed=0)
