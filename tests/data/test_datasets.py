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


def test_downloaded_enwik8_must_have_the_published_md5(tmp_path, monkeypatch):
    data = bytes(range(256)) * 4
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as zf:
        zf.writestr("enwik8", data)
    size = (tmp_path / "enwik8.zip").stat().st_size
    monkeypatch.setitem(registry.SOURCES, "enwik8", [Source((tmp_path / "enwik8.zip").as_uri(), "enwik8.zip",
                                                            size=size)])
    with pytest.raises(DownloadError, match="not the published a1fa5ffddb56f4953e226637dabbb36a"):
        prepare("enwik8", tmp_path / "d", cache=tmp_path / "cache")
    assert not (tmp_path / "d").exists()
    monkeypatch.setitem(registry.CONTENT_MD5, "enwik8", hashlib.md5(data).hexdigest())
    ds = PreparedDataset(prepare("enwik8", tmp_path / "d", cache=tmp_path / "cache"))
    assert ds.split("train").tobytes() == data[:921]
    # A file the user passes is theirs to choose ("any file: split 90/5/5"): no md5 demanded.
    monkeypatch.setitem(registry.CONTENT_MD5, "enwik8", "0" * 32)
    PreparedDataset(prepare("enwik8", tmp_path / "e", from_file=tmp_path / "enwik8.zip"))


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
    with pytest.raises(ValueError, match="smaller than the corpus's first file .* at least 35"):
        stdlib_corpus(max_bytes=20, root=root)  # used to say "found no Python files"


def _imagenet_zip(path, members, rng, rows_per_batch=1):
    """A zip of npz batches as image-net.org ships them; returns {batch name: rows (N, 12288)}."""
    rows = {}
    with zipfile.ZipFile(path, "w") as zf:
        for m in members:
            rows[m] = rng.integers(0, 256, (rows_per_batch, 12288), dtype=np.uint8)
            buf = io.BytesIO()
            np.savez_compressed(buf, data=rows[m], labels=np.arange(rows_per_batch))
            zf.writestr(f"x/{m}.npz", buf.getvalue())
    return rows


def test_imagenet64_streams_rows_with_bounded_memory(tmp_path, monkeypatch):
    import tracemalloc

    from routeformer.data import images

    rng = np.random.default_rng(5)
    order = [1, 2, 3, 4, 5, 6, 7, 10]
    train = [f"train_data_batch_{i}" for i in sorted(order, key=str)]  # stored 1, 10, 2, ...
    rows = _imagenet_zip(tmp_path / "Imagenet64_train_part1_npz.zip", train, rng, rows_per_batch=16)
    rows |= _imagenet_zip(tmp_path / "Imagenet64_val_npz.zip", ["val_data"], rng, rows_per_batch=4)
    total = sum(r.nbytes for r in rows.values())  # 1.6 MB of random (incompressible) pixels
    monkeypatch.setattr(images, "CHUNK_ROWS", 4, raising=False)
    tracemalloc.start()
    try:
        ds = PreparedDataset(prepare("imagenet64", tmp_path / "d", from_file=tmp_path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Reading every batch into memory first (as before) peaks above `total`. Streaming holds one
    # chunk of rows and the zip readers' buffers (zipfile's seek within a member reads up to 16 MB at
    # once: here one batch's npz, 200 kB).
    assert peak < total / 3, (peak, total)
    got = np.asarray(ds.split("train")).reshape(-1, 12288)
    expected = np.concatenate([images.chw_to_hwc(rows[f"train_data_batch_{i}"], 64) for i in order])
    assert np.array_equal(got, expected)
    assert np.array_equal(np.asarray(ds.split("test")).reshape(-1, 12288), images.chw_to_hwc(rows["val_data"], 64))


def test_imagenet64_reads_each_batch_once(tmp_path):
    rng = np.random.default_rng(6)
    src = tmp_path / "src"
    src.mkdir()
    rows = _imagenet_zip(src / "Imagenet64_train_part1_npz.zip", ["train_data_batch_1"], rng, rows_per_batch=2)
    _imagenet_zip(src / "Imagenet64_val_npz.zip", ["val_data"], rng)
    # The same batch extracted beside its zip, and the folder passed alongside one of its own files.
    with zipfile.ZipFile(src / "Imagenet64_train_part1_npz.zip") as zf:
        (src / "train_data_batch_1.npz").write_bytes(zf.read("x/train_data_batch_1.npz"))
    from routeformer.data import images

    ds = PreparedDataset(prepare("imagenet64", tmp_path / "d", from_file=src))
    assert np.array_equal(np.asarray(ds.split("train")).reshape(-1, 12288),
                          images.chw_to_hwc(rows["train_data_batch_1"], 64))  # 2 images, not 4
    members = images.imagenet64_members([src, src / "Imagenet64_val_npz.zip", src])
    assert [key for key, _ in members] == [("train", 1), ("valid", 0)]
    other = tmp_path / "other"
    other.mkdir()
    _imagenet_zip(other / "more.zip", ["train_data_batch_1"], rng, rows_per_batch=3)
    with pytest.raises(ValueError, match="differ in size: remove one"):
        images.imagenet64_members([src, other])


def test_imagenet64_wrong_image_size_is_named(tmp_path):
    for name, shape in (("train_data_batch_1", (2, 3072)), ("val_data", (2, 3072))):
        np.savez(tmp_path / f"{name}.npz", data=np.zeros(shape, dtype=np.uint8))
    with pytest.raises(ValueError, match="not 12288"):
        prepare("imagenet64", tmp_path / "d", from_file=tmp_path)
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d.*"))


def test_prepare_leaves_an_existing_out_tmp_alone(tmp_path):
    # OUT.tmp was the writer's fixed scratch name, deleted as "debris": it may be the user's folder.
    (tmp_path / "c.txt").write_bytes(b"some text to split into three parts " * 10)
    mine = tmp_path / "d.tmp"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    words = tmp_path / "w"
    words.mkdir()
    (words / "wiki.train.tokens").write_text("a b\n")
    (words / "wiki.valid.tokens").write_text("a\n")
    (words / "wiki.test.tokens").write_text("zz\n")  # not in the vocabulary, which has no <unk>
    with pytest.raises(ValueError, match="outside the training vocabulary"):  # fails mid-write: abort()
        prepare("wikitext103", tmp_path / "d", from_file=words)
    assert (mine / "keep.txt").read_text() == "mine"
    out = prepare("stdlib", tmp_path / "d", from_file=tmp_path / "c.txt")
    assert (mine / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "d", "d.tmp", "w"]  # no scratch left
    assert PreparedDataset(out).meta.splits["train"]["tokens"] == int(360 * 0.9)
    assert out.stat().st_mode & 0o777 == mine.stat().st_mode & 0o777  # as mkdir makes it, not mkdtemp's 0700
