"""`load_original_tokenizer`: an original checkpoint's tokenizer without its remote code; InternLM2's
sentencepiece tokenizer is rebuilt as an equivalent fast tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import CheckpointError
from .config import PathLike, read_json

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _sentencepiece_fast_tokenizer(folder: Path, tok_cfg: dict):
    """A fast tokenizer equal to an InternLM2 sentencepiece tokenizer (plus its added tokens).

    The InternLM2 tokenizer splits the text on its added tokens and encodes each piece with the
    sentencepiece BPE model (byte fallback, no dummy prefix), then puts BOS in front. The same is built here
    with `tokenizers`: a BPE model with the sentencepiece vocabulary and merges, spaces as '▁', added tokens
    at their ids, and a post-processor that adds BOS.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges, import_protobuf

    model_file = folder / "tokenizer.model"
    try:
        proto = import_protobuf().ModelProto()
        proto.ParseFromString(model_file.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{model_file}: file not found (the InternLM2 tokenizer needs it)") from None
    except Exception as e:  # protobuf DecodeError
        raise CheckpointError(f"{model_file}: not a sentencepiece model ({e})") from None
    if proto.trainer_spec.model_type != 2:
        raise CheckpointError(f"{model_file}: a sentencepiece BPE model was expected (model_type 2)")

    added: dict[int, dict] = {}
    for idx, tok in (tok_cfg.get("added_tokens_decoder") or {}).items():
        added[int(idx)] = tok if isinstance(tok, dict) else {"content": str(tok)}
    added_json = folder / "added_tokens.json"
    if added_json.is_file():
        for content, idx in read_json(added_json).items():
            added.setdefault(int(idx), {"content": content, "special": True})

    pieces = [p.piece for p in proto.pieces]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = generate_merges(vocab, [(p.piece, p.score) for p in proto.pieces])
    for idx, tok in added.items():  # added tokens take over the (unused) pieces at their ids
        if idx < len(pieces) and pieces[idx] != tok["content"]:
            vocab.pop(pieces[idx], None)
            vocab[tok["content"]] = idx
    unk = proto.trainer_spec.unk_piece or "<unk>"
    tok = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    norm = [normalizers.Replace(" ", "▁")]
    if proto.normalizer_spec.add_dummy_prefix:
        norm.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(norm)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    # sentencepiece keeps user-defined pieces whole; make them atomic here as well
    user_defined = [AddedToken(p.piece, special=False, normalized=False)
                    for i, p in enumerate(proto.pieces) if p.type == 4 and i not in added]
    tok.add_tokens(user_defined)
    tok.add_special_tokens([
        AddedToken(t["content"], special=bool(t.get("special", True)), normalized=bool(t.get("normalized", False)),
                   lstrip=bool(t.get("lstrip", False)), rstrip=bool(t.get("rstrip", False)),
                   single_word=bool(t.get("single_word", False)))
        for _, t in sorted(added.items())
    ])
    for idx, t in added.items():
        if tok.token_to_id(t["content"]) != idx:
            raise CheckpointError(f"{folder}: added token {t['content']!r} would not get its id {idx}")

    def _name(value: Any, default: str | None) -> str | None:
        if isinstance(value, dict):
            return value.get("content", default)
        return value if value is not None else default

    bos = _name(tok_cfg.get("bos_token"), proto.trainer_spec.bos_piece or "<s>")
    eos = _name(tok_cfg.get("eos_token"), proto.trainer_spec.eos_piece or "</s>")
    add_bos = bool(tok_cfg.get("add_bos_token", True))
    add_eos = bool(tok_cfg.get("add_eos_token", False))
    single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
    specials = [(t, tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    extra = [t for t in tok_cfg.get("additional_special_tokens") or [] if isinstance(t, str)]
    kwargs: dict[str, Any] = {
        "tokenizer_object": tok,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": _name(tok_cfg.get("unk_token"), unk),
        "pad_token": _name(tok_cfg.get("pad_token"), None),
        "model_max_length": tok_cfg.get("model_max_length", 4096),
        "clean_up_tokenization_spaces": bool(tok_cfg.get("clean_up_tokenization_spaces", False)),
    }
    if extra:
        kwargs["additional_special_tokens"] = extra
    if tok_cfg.get("chat_template"):
        kwargs["chat_template"] = tok_cfg["chat_template"]
    fast = PreTrainedTokenizerFast(**kwargs)
    return fast


# Tokenizer classes that are sentencepiece + added tokens and that we rebuild without remote code.
_SENTENCEPIECE_CLASSES = {"InternLM2Tokenizer", "InternLM2TokenizerFast"}


def load_original_tokenizer(path: PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer of an original checkpoint folder, never running its code.

    InternLM2 folders (`tokenizer.model` + `tokenizer_class: InternLM2Tokenizer`) get an equivalent fast
    tokenizer built from the sentencepiece model; folders whose tokenizer class transformers knows (Qwen2,
    Llama, ...) load with `trust_remote_code=False`.
    """
    from transformers import AutoTokenizer, PretrainedConfig

    folder = Path(path)
    cfg_path = folder / "tokenizer_config.json"
    tok_cfg = read_json(cfg_path) if cfg_path.is_file() else {}
    cls = str(tok_cfg.get("tokenizer_class") or "")
    if cls in _SENTENCEPIECE_CLASSES:
        return _sentencepiece_fast_tokenizer(folder, tok_cfg)
    if cls.startswith("InternLM"):
        raise CheckpointError(
            f"{cfg_path}: tokenizer class {cls!r} exists only as remote code, and its behaviour is not "
            "reproduced here (InternLM2Tokenizer is)"
        )
    if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        raise CheckpointError(
            f"{folder}: no tokenizer files (tokenizer.json, vocab.json + merges.txt, tokenizer.model)"
        )
    try:
        # An empty config: otherwise transformers reads the original config.json (model_type internvl_chat,
        # which it does not know) and logs "You are using a model of type `internvl_chat` to instantiate a
        # model of type ``"; the tokenizer class comes from tokenizer_config.json either way.
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, config=PretrainedConfig())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: cannot load the tokenizer without remote code ({e})") from None
