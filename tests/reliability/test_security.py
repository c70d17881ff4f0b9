"""Security guarantees: no checkpoint code runs, no pickle is loaded."""

from __future__ import annotations

import json
import shutil

import pytest

from internvl_lora.demo import prepare
from internvl_lora.errors import CheckpointError
from internvl_lora.internvl.checkpoint import load_model, load_tokenizer
from internvl_lora.internvl.format.save import convert_checkpoint


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    d = tmp_path_factory.mktemp("sec")
    prepare(d, n_train=2, n_heldout=1)
    out = d / "original"
    convert_checkpoint(d / "model", out, "original", without_code=True)
    return d, out


def test_checkpoint_code_never_runs(original, tmp_path):
    d, out = original
    marker = tmp_path / "code-ran"
    evil = f"open({str(marker)!r}, 'w').write('x')\n"
    for name in ("modeling_internvl_chat.py", "configuration_internvl_chat.py", "tokenization_internlm2.py"):
        (out / name).write_text(evil)
    cfg = json.loads((out / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                       "AutoModel": "modeling_internvl_chat.InternVLChatModel"}
    (out / "config.json").write_text(json.dumps(cfg))
    load_tokenizer(out)
    model = load_model(out)
    assert model is not None
    assert not marker.exists(), "a .py file of the checkpoint was executed"


def test_pickle_weights_are_refused(original, tmp_path):
    d, out = original
    pickled = tmp_path / "pickled"
    shutil.copytree(out, pickled)
    for f in pickled.glob("*.safetensors*"):
        f.unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(pickled)
