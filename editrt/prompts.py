"""Task prompts initialised from text with the SD-2 text encoder (paper 000 App. A.2).

SEELE learns each task prompt (50 tokens x 1024, task inversion), "initialized with text
descriptions from the task instructions". `write_prompts_from_text` does that initialisation and
stops there: the result is a working `task_prompts.safetensors` for a user who has the public SD-2
inpainting weights (with their `text_encoder/` and `tokenizer/`) but no trained prompts.

How a 77-position CLIP encoding becomes an [L, C] prompt (L = `tokens`, 50 by default):
the text is tokenized exactly as diffusers' `encode_prompt` does (padded to the tokenizer's
max length, 77, truncated beyond it), the encoder runs once, and the prompt is the first L
positions of `last_hidden_state`. The paper does not say how it cut 77 to 50; this choice keeps
every position a plain SD-2 text embedding: CLIP's attention is causal, so position i depends on
tokens 0..i only and the first L positions are what the encoder gives for those L tokens. A
description of up to L - 2 tokens keeps its BOS, words and EOS; a longer one loses its end
(logged). `null`, the classifier-free-guidance embedding, is the empty prompt's encoding cut the
same way: what diffusers uses as `negative_prompt_embeds` for `negative_prompt=""`.

Tasks: any of remove, complete, harmonize. Tasks not given are kept from the output file when it
exists (same L and C; `null` is always recomputed from ""); with no file to keep them from, every
task must be given. The file is written atomically; its metadata records the texts.
"""
from __future__ import annotations

import json
from pathlib import Path

from editrt.errors import InputError
from editrt.models.components import WeightsLayout
from editrt.models.files import write_atomic
from editrt.models.inpaint import PROMPT_KEYS, TASKS, load_task_prompts, save_task_prompts
from editrt.models.text_prompts import TextPromptEncoder

NULL_TEXT = ""  # the unconditional prompt: diffusers' default negative prompt


def check_texts(texts: dict) -> dict[str, str]:
    """{task: description} with known task names and string descriptions (an empty one is allowed: SD with no prompt)."""
    if not isinstance(texts, dict) or not texts:
        raise InputError(f"--from-text: expected TASK=TEXT for some of {', '.join(TASKS)}", field='texts')
    for task, text in texts.items():
        if task == "null":
            raise InputError("--from-text null=...: null is always the empty prompt's encoding (classifier-free guidance)", field='texts')
        if task not in TASKS:
            raise InputError(f"--from-text: unknown task {task!r}; expected {', '.join(TASKS)}", field='texts')
        if not isinstance(text, str):
            raise InputError(f"--from-text {task}: expected a text, got {type(text).__name__}", field='texts')
    return dict(texts)


def _output_path(layout: WeightsLayout, output: str | Path | None) -> Path:
    path = layout.task_prompts if output is None else Path(output)
    if path.suffix != ".safetensors":
        raise InputError(f"-o {path}: expected a .safetensors file name", field='output')
    if path.is_dir():
        raise InputError(f"-o {path}: is a directory; expected a .safetensors file name", field='output')
    return path


def _check_tokens(tokens, max_length: int) -> int:
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise InputError(f"--tokens {tokens!r}: expected a positive integer (the paper uses 50)", field='tokens')
    if tokens > max_length:
        raise InputError(f"--tokens {tokens}: the text encoder gives {max_length} positions; expected at most that "
                         "(the paper uses 50)", field='tokens')
    return tokens


def _kept_prompts(path: Path, missing: list[str], tokens: int, width: int) -> tuple[dict, dict]:
    """The existing file's tensors for the tasks not given, and its recorded texts for them."""
    if not path.is_file():
        raise InputError(f"--from-text: no text for {', '.join(missing)} and {path} does not exist to keep "
                         f"{'it' if len(missing) == 1 else 'them'} from; give all of {', '.join(TASKS)}", field='texts')
    existing = load_task_prompts(path, width)
    length = existing["remove"].shape[0]
    if length != tokens:
        raise InputError(f"--tokens {tokens}: {path} holds {length}-token prompts, kept for "
                         f"{', '.join(missing)}; all four must have one length (use --tokens {length})", field='tokens')
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    try:
        texts = json.loads(metadata.get("texts", "{}"))
    except json.JSONDecodeError:
        texts = {}
    texts = texts if isinstance(texts, dict) else {}
    return {t: existing[t] for t in missing}, {t: texts[t] for t in missing if isinstance(texts.get(t), str)}


def write_prompts_from_text(directory: str | Path, texts: dict, output: str | Path | None = None, tokens: int = 50,
                            log=lambda what: None, device="cpu") -> Path:
    """Encode task descriptions into `output` (default DIR/task_prompts.safetensors); returns its path."""
    # 1. Check inputs (before loading anything).
    texts = check_texts(texts)
    layout = WeightsLayout(directory)
    layout.check_root()
    path = _output_path(layout, output)
    _check_tokens(tokens, 10**9)  # the type and sign now; the encoder's own limit once it is loaded

    # 2. The text side of the SD-2 inpainting folder.
    encoder = TextPromptEncoder(layout, device)
    tokens = _check_tokens(tokens, encoder.max_length)
    width = encoder.text_encoder.config.hidden_size

    # 3. Tasks not given: kept from the existing file (same [L, C]), or an error naming them.
    missing = [t for t in TASKS if t not in texts]
    kept, kept_texts = _kept_prompts(path, missing, tokens, width) if missing else ({}, {})
    if kept:
        log(f"kept {', '.join(missing)} from {path}")

    # 4. Encode: each task's description, and the empty prompt for null.
    prompts = dict(kept)
    for task, text in texts.items():
        n = encoder.count(text)
        if n > tokens:
            log(f"{task}: the text is {n} tokens with BOS and EOS; the prompt keeps the first {tokens} positions "
                "(its end is cut)")
        prompts[task] = encoder.encode(text, tokens)
    prompts["null"] = encoder.encode(NULL_TEXT, tokens)

    # 5. Write atomically, saying where the prompts came from (a kept task's text, if its file recorded one).
    recorded = {t: ({**kept_texts, **texts})[t] for t in TASKS if t in texts or t in kept_texts}
    metadata = {
        "content": "task prompts initialised from text (paper 000 App. A.2): the first L positions of the SD-2 "
                   "text encoder's last hidden state, as diffusers' encode_prompt computes it",
        "init": "text",
        "texts": json.dumps(recorded, ensure_ascii=False),
        "from_text": ",".join(t for t in TASKS if t in recorded),
        "kept": ",".join(missing) if kept else "",
        "null": "the empty prompt's encoding (diffusers' negative_prompt_embeds for negative_prompt='')",
        "tokens": str(tokens),
        "text_encoder": str(layout.text_encoder),
    }
    write_atomic(path, lambda tmp: save_task_prompts(tmp, {k: prompts[k] for k in PROMPT_KEYS},
                                                     base_model=str(layout.inpaint), metadata=metadata))
    return path
