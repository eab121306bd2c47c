"""Datasets prepared once per node: the cached splits are the source's, bit for bit, and a second
trial does not read the source files again."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainables import datacache
from trainables.data import load_dataset


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(datacache.CACHE_ENV, str(tmp_path / "cache"))
    datacache._in_process.clear()
    yield tmp_path / "cache"
    datacache._in_process.clear()


def assert_same(a, b) -> None:
    for t in datacache.TENSORS:
        x, y = getattr(a, t), getattr(b, t)
        assert x.dtype == y.dtype and torch.equal(x, y), t
    assert a.class_counts == b.class_counts and a.num_classes == b.num_classes and a.name == b.name
    assert (a.mean, a.std, a.augment) == (b.mean, b.std, b.augment)
    assert (a.many_threshold, a.few_threshold) == (b.many_threshold, b.few_threshold)
    assert a.indices.keys() == b.indices.keys()
    for k in a.indices:
        np.testing.assert_array_equal(a.indices[k], b.indices[k])


def test_cached_splits_equal_the_source_and_are_not_read_again(cache, tmp_path, make_cifar, monkeypatch):
    make_cifar(tmp_path / "data", 10, 60, 10)
    direct = load_dataset("cifar10-lt", tmp_path / "data", rho=10, val_per_class=5, download=False)
    first = datacache.cached_dataset("cifar10-lt", tmp_path / "data", 10, 5)
    assert_same(first, direct)
    assert len(list(cache.iterdir())) == 1
    # another process on the node: no in-process copy, and reading the source would fail
    datacache._in_process.clear()
    key = datacache.cache_key("cifar10-lt", tmp_path / "data", 10, 5)

    def no_source(*a, **k):
        raise AssertionError("the source was read again")

    monkeypatch.setattr(datacache, "load_dataset", no_source)
    again = datacache.cached_dataset("cifar10-lt", tmp_path / "data", 10, 5)
    assert_same(again, direct)
    assert datacache.cache_key("cifar10-lt", tmp_path / "data", 10, 5) == key
    # trainers normalise and index the tensors; they must behave like ordinary ones
    assert again.x_train.float().mean().item() == pytest.approx(direct.x_train.float().mean().item())


def test_new_options_or_new_files_make_a_new_entry(cache, tmp_path, make_cifar):
    make_cifar(tmp_path / "data", 10, 60, 10)
    k1 = datacache.cache_key("cifar10-lt", tmp_path / "data", 10, 5)
    assert datacache.cache_key("cifar10-lt", tmp_path / "data", 20, 5) != k1
    assert datacache.cache_key("cifar10-lt", tmp_path / "data", 10, 6) != k1
    make_cifar(tmp_path / "data", 10, 60, 10, seed=1)  # the files replaced
    assert datacache.cache_key("cifar10-lt", tmp_path / "data", 10, 5) != k1


def test_a_torn_entry_is_read_from_the_source_again(cache, tmp_path, make_cifar):
    make_cifar(tmp_path / "data", 10, 60, 10)
    datacache.cached_dataset("cifar10-lt", tmp_path / "data", 10, 5)
    datacache._in_process.clear()
    entry = cache / datacache.cache_key("cifar10-lt", tmp_path / "data", 10, 5)
    (entry / "x_train.npy").write_bytes(b"\x93NUMPY torn")
    again = datacache.cached_dataset("cifar10-lt", tmp_path / "data", 10, 5)
    assert_same(again, load_dataset("cifar10-lt", tmp_path / "data", rho=10, val_per_class=5, download=False))
    datacache._in_process.clear()
    assert_same(datacache.cached_dataset("cifar10-lt", tmp_path / "data", 10, 5), again)  # rewritten


def test_off_reads_the_source_every_time(tmp_path, monkeypatch):
    monkeypatch.setenv(datacache.CACHE_ENV, "off")
    assert datacache.cache_root() is None
    a = datacache.cached_dataset("digits-lt")
    assert a is not datacache.cached_dataset("digits-lt")
