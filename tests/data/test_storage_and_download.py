"""Splits are memory-mapped (not read into memory), and downloads say who is asking."""
import numpy as np

from routeformer.data import PreparedDataset, prepare
from routeformer.data import download, registry
from routeformer.data.download import Source, fetch


def test_splits_are_read_only_memory_maps(tmp_path):
    (tmp_path / "c.txt").write_bytes(bytes(range(256)) * 8)
    ds = PreparedDataset(prepare("stdlib", tmp_path / "d", from_file=tmp_path / "c.txt"))
    for split in ("train", "valid", "test"):
        tokens = ds.split(split)
        assert isinstance(tokens, np.memmap) and not tokens.flags.writeable
        assert str(tokens.filename) == str((tmp_path / "d" / f"{split}.bin").resolve())
    assert ds.split("train") is ds.split("train")  # mapped once


def test_downloads_send_a_user_agent(tmp_path, monkeypatch):
    # The Wikitext host refuses urllib's default "Python-urllib/3.x" agent with 403.
    (tmp_path / "src.bin").write_bytes(b"archive")
    seen = []
    real_urlopen = download.urllib.request.urlopen

    def urlopen(request, *args, **kwargs):
        seen.append(request.get_header("User-agent"))
        return real_urlopen(request, *args, **kwargs)

    monkeypatch.setattr(download.urllib.request, "urlopen", urlopen)
    fetch(Source((tmp_path / "src.bin").as_uri(), "a.bin", size=7), tmp_path / "cache")
    assert seen == [download.USER_AGENT] and seen[0].startswith("routeformer/")


def test_wikitext_sources_avoid_the_dead_s3_bucket_and_keep_checksums():
    # s3.amazonaws.com/research.metamind.io answers 403 since 2024; the archives and checksums are unchanged.
    for name in ("wikitext103", "wikitext103_bytes"):
        (source,) = registry.SOURCES[name]
        assert source.url.startswith("https://wikitext.smerity.com/") and "metamind" not in source.url
        assert source.md5 or source.sha1
