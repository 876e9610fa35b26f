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

Presets (`--preset sd-no|sd-simple|sd-complex`): the texts of SEELE Table 1's SD baselines, encoded at all 77
positions as diffusers' pipeline encodes a text prompt, so `editrt inpaint` with them is SD-2 inpainting given that
text. Textual-inversion embeddings (`--from-embedding`): a token's learned input embedding, added to the tokenizer
as diffusers' `load_textual_inversion` adds it, and a prompt holding the token run through the encoder.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from editrt.errors import InputError
from editrt.models.components import WeightsLayout
from editrt.models.files import write_atomic
from editrt.models.inpaint import PROMPT_KEYS, TASKS, load_task_prompts, save_task_prompts
from editrt.models.text_prompts import TextPromptEncoder

NULL_TEXT = ""  # the unconditional prompt: diffusers' default negative prompt

# SEELE Table 1's SD baselines, quoted from paper 000 Sec. 4 ("Competitors and setup on ReS"): "i) SD no performs
# unconditional generation; ii) SD simple uses "inpaint" and "complete the subject"; iii) SD complex uses
# "Incorporate visually cohesive and high-fidelity background and texture into the provided image through
# inpainting" and "Complete the subject by filling in the missing region with visually cohesive and high-fidelity
# background and texture" for subject removal and completion tasks, respectively." Unconditional generation is the
# empty prompt (its encoding equals `null`, so guidance has nothing to push toward).
# The paper gives no harmonize text for these baselines: for Table 1 "SEELE does not utilize any pre-processing or
# post-processing techniques" (same paragraph), so no harmonize stage runs. The presets leave harmonize to `--from-text harmonize=TEXT`, else the
# empty prompt (SD with no prompt), and record that the paper did not give it.
PRESETS = {
    "sd-no": {"remove": "", "complete": ""},
    "sd-simple": {"remove": "inpaint", "complete": "complete the subject"},
    "sd-complex": {
        "remove": "Incorporate visually cohesive and high-fidelity background and texture into the provided image "
                  "through inpainting",
        "complete": "Complete the subject by filling in the missing region with visually cohesive and high-fidelity "
                    "background and texture",
    },
}
PRESET_SOURCE = "SEELE (paper 000) Sec. 4, 'Competitors and setup on ReS': the SD baselines of Table 1"


def write_prompts_from_preset(directory: str | Path, preset: str, texts: dict | None = None,
                              output: str | Path | None = None, log=lambda what: None, device="cpu") -> Path:
    """A Table 1 SD-baseline prompt set at all 77 positions; `texts` may add only what the paper leaves open
    (harmonize)."""
    if preset not in PRESETS:
        raise InputError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}", field="preset")
    quoted = PRESETS[preset]
    extra = check_texts(texts) if texts else {}
    clash = [t for t in extra if t in quoted]
    if clash:
        raise InputError(f"--from-text {', '.join(clash)}: --preset {preset} quotes the paper's text for "
                         f"{', '.join(clash)}; give only {', '.join(t for t in TASKS if t not in quoted)} with it",
                         field="texts")
    open_tasks = [t for t in TASKS if t not in quoted and t not in extra]
    if open_tasks:
        log(f"{', '.join(open_tasks)}: the paper gives no text for the SD baselines; using the empty prompt "
            "(give --from-text TASK=TEXT to set it)")
    chosen = {**quoted, **extra, **{t: NULL_TEXT for t in open_tasks}}
    return write_prompts_from_text(directory, {t: chosen[t] for t in TASKS}, output=output, tokens=None, log=log,
                                   device=device, metadata={
                                       "preset": preset,
                                       "preset_source": PRESET_SOURCE,
                                       "not_from_paper": ",".join(t for t in TASKS if t not in quoted),
                                   })


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


def _kept_prompts(path: Path, missing: list[str], tokens: int, width: int, source: str = "text") -> tuple[dict, dict]:
    """The existing file's tensors for the tasks not given, and its recorded texts for them."""
    if not path.is_file() and source == "embedding":
        raise InputError(f"--from-embedding writes one task's prompt; {path} does not exist to keep "
                         f"{', '.join(missing)} from; write it first (--from-text or --preset) or give -o an "
                         "existing prompts file", field="output")
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


def write_prompts_from_text(directory: str | Path, texts: dict, output: str | Path | None = None,
                            tokens: int | None = 50, log=lambda what: None, device="cpu",
                            metadata: dict[str, str] | None = None) -> Path:
    """Encode task descriptions into `output` (default DIR/task_prompts.safetensors); returns its path.
    `tokens=None` keeps every position of the encoder (77: diffusers' own text embeddings); `metadata` adds entries."""
    # 1. Check inputs (before loading anything).
    texts = check_texts(texts)
    layout = WeightsLayout(directory)
    layout.check_root()
    path = _output_path(layout, output)
    if tokens is not None:
        _check_tokens(tokens, 10**9)  # the type and sign now; the encoder's own limit once it is loaded

    # 2. The text side of the SD-2 inpainting folder.
    encoder = TextPromptEncoder(layout, device)
    tokens = encoder.max_length if tokens is None else _check_tokens(tokens, encoder.max_length)

    # 3. Tasks not given: kept from the existing file (same [L, C]), or an error naming them.
    missing, kept, kept_texts = _keep(path, list(texts), tokens, encoder, log)

    # 4. Encode each task's description.
    prompts = dict(kept)
    for task, text in texts.items():
        prompts[task] = _encode(encoder, task, text, tokens, log)

    # 5. Write, saying where the prompts came from (a kept task's text, if its file recorded one).
    recorded = {t: ({**kept_texts, **texts})[t] for t in TASKS if t in texts or t in kept_texts}
    return _write(layout, path, encoder, tokens, prompts, {
        "content": "task prompts initialised from text (paper 000 App. A.2): the first L positions of the SD-2 "
                   "text encoder's last hidden state, as diffusers' encode_prompt computes it",
        "init": "text",
        "texts": json.dumps(recorded, ensure_ascii=False),
        "from_text": ",".join(t for t in TASKS if t in recorded),
        "kept": ",".join(missing) if kept else "",
        **(metadata or {}),
    })


def _keep(path: Path, given: list[str], tokens: int, encoder: TextPromptEncoder, log,
          source: str = "text") -> tuple[list, dict, dict]:
    missing = [t for t in TASKS if t not in given]
    width = encoder.text_encoder.config.hidden_size
    kept, kept_texts = _kept_prompts(path, missing, tokens, width, source) if missing else ({}, {})
    if kept:
        log(f"kept {', '.join(missing)} from {path}")
    return missing, kept, kept_texts


def _encode(encoder: TextPromptEncoder, task: str, text: str, tokens: int, log) -> torch.Tensor:
    n = encoder.count(text)
    if n > tokens:
        log(f"{task}: the text is {n} tokens with BOS and EOS; the prompt keeps the first {tokens} positions "
            "(its end is cut)")
    return encoder.encode(text, tokens)


def _write(layout: WeightsLayout, path: Path, encoder: TextPromptEncoder, tokens: int, prompts: dict,
           metadata: dict[str, str]) -> Path:
    """Add `null` (the empty prompt's encoding) and write the four prompts atomically."""
    prompts = {**prompts, "null": encoder.encode(NULL_TEXT, tokens)}
    metadata = {
        **metadata,
        "null": "the empty prompt's encoding (diffusers' negative_prompt_embeds for negative_prompt='')",
        "tokens": str(tokens),
        "text_encoder": str(layout.text_encoder),
    }
    write_atomic(path, lambda tmp: save_task_prompts(tmp, {k: prompts[k] for k in PROMPT_KEYS},
                                                     base_model=str(layout.inpaint), metadata=metadata))
    return path


def read_embedding(path: str | Path) -> tuple[str, torch.Tensor]:
    """(token, [n, C] float32) from a textual-inversion file in the formats diffusers' `load_textual_inversion`
    reads: diffusers' {token: [n, C] or [C]} (`learned_embeds.safetensors` / `.bin`) or A1111's
    {"name": token, "string_to_param": {"*": [n, C]}} (.bin / .pt)."""
    path = Path(path)
    where = f"--from-embedding {path}"
    if not path.is_file():
        raise InputError(f"{where}: no such file; expected a textual-inversion embedding (.safetensors or .bin)",
                         field="from_embedding")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"{where}: not a readable safetensors file ({e})", field="from_embedding") from None
    elif path.suffix in (".bin", ".pt"):
        import pickle

        try:  # weights_only: tensors and plain containers, never code (as diffusers loads .bin)
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{where}: not a readable torch file ({first})", field="from_embedding") from None
    else:
        raise InputError(f"{where}: expected a .safetensors or .bin (.pt) textual-inversion file",
                         field="from_embedding")
    if isinstance(state, dict) and len(state) == 1:
        token, vectors = next(iter(state.items()))
    elif isinstance(state, dict) and isinstance(state.get("string_to_param"), dict) and "name" in state:
        token, vectors = state["name"], state["string_to_param"].get("*")
    else:
        keys = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise InputError(f"{where}: holds {keys}; expected one {{token: [n, C] tensor}} entry (diffusers) or "
                         "'name' + 'string_to_param' (A1111)", field="from_embedding")
    if not isinstance(token, str) or not token or token != token.strip() or " " in token:
        raise InputError(f"{where}: token {token!r}; expected a non-empty name without spaces",
                         field="from_embedding")
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point() or vectors.ndim not in (1, 2) \
            or vectors.numel() == 0:
        got = f"{vectors.dtype} {list(vectors.shape)}" if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise InputError(f"{where}: {token!r} is {got}; expected a float [n, C] or [C] tensor", field="from_embedding")
    if not torch.isfinite(vectors).all():
        raise InputError(f"{where}: {token!r} holds NaN or infinite values", field="from_embedding")
    return token, vectors.reshape(-1, vectors.shape[-1]).float()


def write_prompts_from_embedding(directory: str | Path, embedding: str | Path, task: str, text: str | None = None,
                                 output: str | Path | None = None, tokens: int | None = 50, log=lambda what: None,
                                 device="cpu") -> Path:
    """`task`'s prompt from a textual-inversion embedding: `text` (default: the token alone) holding its token,
    encoded by the SD-2 text encoder with the token added; other tasks kept as --from-text keeps them."""
    # 1. Check inputs (before loading the encoder).
    if task not in TASKS:
        raise InputError(f"--task {task!r}: expected one of {', '.join(TASKS)}", field="task")
    token, vectors = read_embedding(embedding)
    text = token if text is None else text
    if not isinstance(text, str):
        raise InputError(f"--text: expected a text, got {type(text).__name__}", field="text")
    layout = WeightsLayout(directory)
    layout.check_root()
    path = _output_path(layout, output)
    if tokens is not None:
        _check_tokens(tokens, 10**9)

    # 2. The encoder with the token added (checked first against its vocabulary and input width).
    encoder = TextPromptEncoder(layout, device)
    tokens = encoder.max_length if tokens is None else _check_tokens(tokens, encoder.max_length)
    width = encoder.text_encoder.get_input_embeddings().weight.shape[1]
    if vectors.shape[1] != width:
        raise InputError(f"--from-embedding {embedding}: {token!r} is {list(vectors.shape)}; expected [n, {width}] "
                         f"(the input embedding width of {layout.text_encoder})", field="from_embedding")
    vocabulary = encoder.tokenizer.get_vocab()
    taken = [t for t in [token] + [f"{token}_{i}" for i in range(1, vectors.shape[0])] if t in vocabulary]
    if taken:
        raise InputError(f"--from-embedding {embedding}: token {taken[0]!r} is already in {layout.tokenizer}; "
                         "expected a new token", field="from_embedding")
    encoder.add_embedding(token, vectors)
    if not encoder.uses(text, token):
        raise InputError(f"--text {text!r}: does not hold the token {token!r}; expected a prompt containing it",
                         field="text")
    missing, kept, kept_texts = _keep(path, [task], tokens, encoder, log, source="embedding")

    # 3. Encode and write.
    prompts = {**kept, task: _encode(encoder, task, text, tokens, log)}
    recorded = {**kept_texts, task: text}
    return _write(layout, path, encoder, tokens, prompts, {
        "content": "task prompts from a textual-inversion embedding: the first L positions of the SD-2 text "
                   "encoder's last hidden state for a prompt holding the token, as diffusers computes it after "
                   "load_textual_inversion",
        "init": "embedding",
        "embedding": str(embedding),
        "token": token,
        "vectors": str(vectors.shape[0]),
        "texts": json.dumps({t: recorded[t] for t in TASKS if t in recorded}, ensure_ascii=False),
        "from_embedding": task,
        "kept": ",".join(missing) if kept else "",
    })
