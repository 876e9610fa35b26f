"""CLIP text encoders and tokenizers (transformers), from local files: the element decoder's text
side (SD-1.5) and the SD-2 inpainting folder's, which initialises task prompts from text
(models/text_prompts.py; paper 000 App. A.2).

`weights init` cannot download CLIP's 49k-token BPE vocabulary, so it writes a small but valid
CLIP BPE tokenizer (the 512 byte-level base tokens, a few merges, the two special tokens) in
CLIP's own file format; real `tokenizer/` and `text_encoder/` folders of SD-1.5 drop in unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from editrt.errors import WeightsError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# A few English merges so common words are single tokens (any list of valid merges would do).
MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"), ("in", "g</w>"), ("o", "f</w>"),
          ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("p", "h"), ("o", "t"), ("ph", "ot"),
          ("phot", "o</w>"), ("o", "n</w>"), ("s", "k"), ("sk", "y</w>")]


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable-unicode table (the base alphabet of its BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_tokenizer(folder: Path, max_length: int = 77) -> int:
    """Write vocab.json / merges.txt / configs of a small CLIP tokenizer; returns its vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    base = _bytes_to_unicode()
    vocab = base + [t + "</w>" for t in base] + ["".join(m) for m in MERGES] + [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in MERGES) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": BOS, "eos_token": EOS,
        "pad_token": EOS, "unk_token": EOS, "do_lower_case": True,
    }, indent=2))
    return len(vocab)


def random_text_encoder(config: dict, tokenizer_vocab: int) -> CLIPTextModel:
    cfg = dict(config)
    if cfg.get("vocab_size", 0) < tokenizer_vocab:
        cfg["vocab_size"] = tokenizer_vocab
    # Pool at our tokenizer's EOS id (CLIP pools the EOS position; the real vocabulary has it at 49407).
    cfg.update(bos_token_id=tokenizer_vocab - 2, eos_token_id=tokenizer_vocab - 1, pad_token_id=tokenizer_vocab - 1)
    return CLIPTextModel(CLIPTextConfig(**cfg)).eval()


def load_text_encoder(folder: Path, dtype: torch.dtype = torch.float32) -> CLIPTextModel:
    if not (folder / "config.json").is_file():
        raise WeightsError(f"{folder / 'config.json'}: missing; expected a transformers CLIPTextModel folder", field="weights")
    try:
        return CLIPTextModel.from_pretrained(folder, local_files_only=True, torch_dtype=dtype).eval()
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise WeightsError(f"{folder}: cannot load the CLIP text encoder ({str(e).strip().splitlines()[0]})", field="weights") from None


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    if not (folder / "vocab.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise WeightsError(f"{folder}: no vocab.json or tokenizer.json; expected a CLIP tokenizer folder", field="weights")
    try:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise WeightsError(f"{folder}: cannot load the CLIP tokenizer ({str(e).strip().splitlines()[0]})", field="weights") from None


@torch.no_grad()
def encode_prompt(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompt: str) -> torch.Tensor:
    """[1, model_max_length (77), D] last hidden state, as diffusers' SD pipelines' `encode_prompt`:
    padded to the tokenizer's max length, truncated beyond it, the padding attention-masked only
    where the encoder's config asks for it (`use_attention_mask`; CLIP's own configs do not)."""
    tokens = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    mask = tokens.attention_mask.to(text_encoder.device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    return text_encoder(tokens.input_ids.to(text_encoder.device), attention_mask=mask)[0]


def token_count(tokenizer: CLIPTokenizer, prompt: str) -> int:
    """Tokens of `prompt` with BOS and EOS, before any truncation."""
    return len(tokenizer(prompt, verbose=False).input_ids)  # verbose: no 'longer than max' warning
