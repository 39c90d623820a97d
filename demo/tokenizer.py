"""Build a real CLIP tokenizer offline from the BPE file that open-clip-torch ships.

open_clip is never imported (it needs torchvision); only its data file is read.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open-clip-torch is not installed; `pip install --no-deps open-clip-torch`")
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.exists():
        raise RuntimeError(f"{path} is missing from the open-clip-torch install")
    return path


def _bytes_to_unicode() -> list[str]:
    # CLIP's reversible byte -> printable-unicode map, in its original order.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer_files(out_dir: str | Path, model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json the way CLIP's SimpleTokenizer builds them."""
    out = Path(out_dir)
    if all((out / name).is_file() for name in ("vocab.json", "merges.txt", "tokenizer_config.json")):
        return out  # written before from the same data file (a machine without open-clip-torch can reuse them)
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(bpe_path(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = _bytes_to_unicode()
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2)
    )
    return out


def load_clip_tokenizer(out_dir: str | Path, model_max_length: int = 77):
    """A CLIPTokenizer with the real vocabulary (from_pretrained: the direct constructor misbuilds it)."""
    from transformers import CLIPTokenizer

    path = write_clip_tokenizer_files(out_dir, model_max_length)
    return CLIPTokenizer.from_pretrained(str(path), model_max_length=model_max_length)
