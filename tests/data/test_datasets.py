"""prepare() of every dataset from local files (fake archives in the canonical layouts), downloads
through file:// URLs, offline errors, and the built-in corpus."""
import hashlib
import io
import json
import pickle
import tarfile
import zipfile

import numpy as np
import pytest

from routeformer.data import PreparedDataset, load_codec, prepare
from routeformer.data import registry
from routeformer.data.corpus import stdlib_corpus
from routeformer.data.download import DownloadError, Source, fetch


def test_enwik8_zip_standard_split(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as zf:
        zf.writestr("enwik8", data)
    ds = PreparedDataset(prepare("enwik8", tmp_path / "d", from_file=tmp_path / "enwik8.zip"))
    assert [len(ds.split(s)) for s in ("train", "valid", "test")] == [900, 50, 50]
    assert b"".join(ds.split(s).tobytes() for s in ("train", "valid", "test")) == data
    assert ds.meta.metric == "bpc" and ds.meta.dtype == "uint8"


def test_truncated_split_file_is_detected(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"abcdefgh" * 20)
    out = prepare("text8", tmp_path / "d", from_file=tmp_path / "t.txt")
    (out / "train.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="incomplete or corrupt"):
        PreparedDataset(out).split("train")


def test_wikitext_words_vocab_and_unk(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "wiki.train.tokens").write_text("a b a <unk>\n\nc a\n")
    (tmp_path / "w" / "wiki.valid.tokens").write_text("a zz\n")
    (tmp_path / "w" / "wiki.test.tokens").write_text("b\n")
    ds = PreparedDataset(prepare("wikitext103", tmp_path / "d", from_file=tmp_path / "w"))
    vocab = json.loads((ds.path / "vocab.json").read_text())
    assert vocab == ["<eos>", "a", "<unk>", "b", "c"]  # by count (3, 3, 1, 1, 1), then alphabetically
    assert [vocab[i] for i in ds.split("train")] == "a b a <unk> <eos> <eos> c a <eos>".split()
    assert [vocab[i] for i in ds.split("valid")] == ["a", "<unk>", "<eos>"]
    assert ds.meta.metric == "ppl"


def _cifar_tar(path, rng):
    originals = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
            originals[name] = data
            blob = pickle.dumps({b"data": data, b"labels": [0, 1]})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return originals


def test_cifar10_pixels_in_hwc_raster_order(tmp_path):
    originals = _cifar_tar(tmp_path / "cifar.tar.gz", np.random.default_rng(1))
    ds = PreparedDataset(prepare("cifar10", tmp_path / "d", from_file=tmp_path / "cifar.tar.gz"))
    assert ds.meta.example_length == 3072 and ds.meta.metric == "bpd"
    train = np.asarray(ds.split("train")).reshape(-1, 3072)
    assert len(train) == 10
    src = originals["data_batch_1"][1]
    for row, col, ch in [(0, 0, 0), (0, 0, 2), (5, 17, 1), (31, 31, 2)]:
        assert train[1, (row * 32 + col) * 3 + ch] == src[ch * 1024 + row * 32 + col]
    assert np.array_equal(np.asarray(ds.split("valid")), np.asarray(ds.split("test")))


def test_imagenet64_from_npz_zips(tmp_path):
    rng = np.random.default_rng(2)
    rows = {}
    for zip_name, members in [("Imagenet64_train_part1_npz.zip", ["train_data_batch_2", "train_data_batch_1"]),
                              ("Imagenet64_val_npz.zip", ["val_data"])]:
        with zipfile.ZipFile(tmp_path / zip_name, "w") as zf:
            for m in members:
                rows[m] = rng.integers(0, 256, (1, 12288), dtype=np.uint8)
                buf = io.BytesIO()
                np.savez(buf, data=rows[m], labels=np.array([1]))
                zf.writestr(f"x/{m}.npz", buf.getvalue())
    ds = PreparedDataset(prepare("imagenet64", tmp_path / "d", from_file=tmp_path))
    train = np.asarray(ds.split("train")).reshape(-1, 12288)
    first = rows["train_data_batch_1"][0]  # batch 1 before batch 2
    assert train[0, (3 * 64 + 7) * 3 + 2] == first[2 * 4096 + 3 * 64 + 7]


def test_pg19_bpe_is_deterministic_and_round_trips(tmp_path):
    rng = np.random.default_rng(3)
    words = ["the", "whale", "ship", "sea", "captain", "said", "and", "of", ",", "."]
    for folder, n in (("train", 3), ("validation", 1), ("test", 1)):
        (tmp_path / "pg" / folder).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "pg" / folder / f"{i}.txt").write_text(" ".join(rng.choice(words, 300)) + "\n")
    a = PreparedDataset(prepare("pg19", tmp_path / "a", from_file=tmp_path / "pg"))
    b = PreparedDataset(prepare("pg19", tmp_path / "b", from_file=tmp_path / "pg"))
    assert np.array_equal(np.asarray(a.split("train")), np.asarray(b.split("train")))
    codec = load_codec(a)
    text = (tmp_path / "pg" / "test" / "0.txt").read_text()
    assert codec.decode(codec.encode(text)) == text
    assert a.meta.splits["test"]["words"] == len(text.split())


def test_fetch_verifies_checksums_over_file_urls(tmp_path):
    blob = b"canonical archive bytes"
    (tmp_path / "src.bin").write_bytes(blob)
    url = (tmp_path / "src.bin").as_uri()
    good = Source(url, "a.bin", size=len(blob), md5=hashlib.md5(blob).hexdigest())
    assert fetch(good, tmp_path / "cache").read_bytes() == blob
    bad = Source(url, "b.bin", sha256="0" * 64)
    with pytest.raises(DownloadError, match="does not match"):
        fetch(bad, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("b.bin*"))  # nothing half-verified is left behind


def test_offline_download_names_from_file(tmp_path):
    with pytest.raises(DownloadError, match="--from-file"):
        fetch(Source("http://127.0.0.1:9/enwik8.zip", "enwik8.zip"), tmp_path)


def test_prepare_downloads_the_canonical_source(tmp_path, monkeypatch):
    data = bytes(range(256)) * 4
    with zipfile.ZipFile(tmp_path / "text8.zip", "w") as zf:
        zf.writestr("text8", data)
    archive = (tmp_path / "text8.zip").read_bytes()
    monkeypatch.setitem(registry.SOURCES, "text8", [Source((tmp_path / "text8.zip").as_uri(), "text8.zip",
                                                           size=len(archive))])
    ds = PreparedDataset(prepare("text8", tmp_path / "d", cache=tmp_path / "cache"))
    assert ds.split("train").tobytes() == data[:921]
    monkeypatch.setitem(registry.SOURCES, "text8", [Source((tmp_path / "text8.zip").as_uri(), "x.zip", size=1)])
    with pytest.raises(DownloadError, match="truncated"):
        prepare("text8", tmp_path / "d2", cache=tmp_path / "cache")


def test_pg19_download_path_with_a_fake_bucket(tmp_path, monkeypatch):
    from routeformer.data import pg19

    bucket = tmp_path / "bucket"
    listing = {}
    for folder in ("train", "validation", "test"):
        (bucket / folder).mkdir(parents=True)
        body = f"{folder} book text and more words here\n".encode() * 20
        (bucket / folder / "1.txt").write_bytes(body)
        md5 = __import__("base64").b64encode(hashlib.md5(body).digest()).decode()
        listing[folder] = {"items": [{"name": f"{folder}/1.txt", "size": str(len(body)), "md5Hash": md5}]}
    monkeypatch.setattr(pg19, "read_url", lambda url: json.dumps(listing[url.split("prefix=")[1].split("/")[0]]))
    monkeypatch.setattr(pg19, "OBJECT", bucket.as_uri() + "/{name}")
    ds = PreparedDataset(prepare("pg19", tmp_path / "d", cache=tmp_path / "cache"))
    assert ds.meta.splits["valid"]["words"] == 7 * 20


def test_imagenet64_without_files_says_how(tmp_path):
    with pytest.raises(ValueError, match="login"):
        prepare("imagenet64", tmp_path / "d")


def test_stdlib_corpus_is_sorted_filtered_and_capped(tmp_path):
    root = tmp_path / "lib"
    for rel in ("b.py", "a/x.py", "test/t.py", "a/tests/u.py", "site-packages/p.py", "c.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\n")
    data, info = stdlib_corpus(root=root)
    assert data == b"# ==== file: a/x.py ====\n# a/x.py\n\n# ==== file: b.py ====\n# b.py\n\n"
    assert info["files"] == 2 and info["sha256"] == hashlib.sha256(data).hexdigest()
    capped, _ = stdlib_corpus(max_bytes=40, root=root)
    assert capped == b"# ==== file: a/x.py ====\n# a/x.py\n\n"
