"""Fixtures shared by the data tests."""

import pytest

from internvl_lora.internvl.checkpoint import load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from internvl_lora.demo import prepare

    d = tmp_path_factory.mktemp("demo")
    prepare(d, n_train=4, n_heldout=2)
    return load_tokenizer(d / "model")
