"""[L, C] task prompts from text with the SD-2 inpainting folder's tokenizer and text encoder (paper 000
App. A.2): what `editrt weights prompts --from-text` (editrt/prompts.py) writes and what `editrt train prompts`
and `train harmonizer` start from (train/inversion.py). It lives in models/ so that train/ reaches it without
importing editrt/'s top layer; it is apart from models/text.py because models/components.py imports that one.
"""
from __future__ import annotations

import torch

from editrt.errors import WeightsError
from editrt.models.components import WeightsLayout
from editrt.models.files import read_json
from editrt.models.text import encode_prompt, load_text_encoder, load_tokenizer, token_count


class TextPromptEncoder:
    """The SD-2 inpainting folder's tokenizer + text encoder, giving [L, C] prompts (float32)."""

    def __init__(self, layout: WeightsLayout, device="cpu"):
        self.tokenizer = load_tokenizer(layout.tokenizer)
        self.text_encoder = load_text_encoder(layout.text_encoder, torch.float32).to(device)
        config = self.text_encoder.config
        self._multi_vector: dict[str, str] = {}  # textual-inversion token -> the tokens it stands for
        self.max_length = min(self.tokenizer.model_max_length, config.max_position_embeddings)
        if len(self.tokenizer) > config.vocab_size:
            raise WeightsError(f"{layout.tokenizer}: {len(self.tokenizer)} tokens but {layout.text_encoder} embeds "
                               f"{config.vocab_size}; expected the tokenizer of that text encoder",
                               field="weights")
        width = read_json(layout.unet / "config.json", "the inpainting UNet config").get("cross_attention_dim")
        if config.hidden_size != width:
            raise WeightsError(f"{layout.text_encoder}: hidden_size {config.hidden_size}, but the UNet's "
                               f"cross_attention_dim is {width}; expected the text encoder of this inpainting model",
                               field="weights")

    def add_embedding(self, token: str, vectors: torch.Tensor) -> None:
        """A textual-inversion token with its [n, C] input embedding, added as diffusers' `load_textual_inversion`
        adds it: n > 1 vectors become tokens `token`, `token_1`, ... `token_{n-1}` (prompts then spell `token` out
        as all of them). The caller checks that the token is new and C is the input embedding's width."""
        names = [token] + [f"{token}_{i}" for i in range(1, vectors.shape[0])]
        # diffusers resizes to len(tokenizer) + n (the rows that ids can reach); the same size gives the same ids
        self.text_encoder.resize_token_embeddings(len(self.tokenizer) + len(names))
        weight = self.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            for name, vector in zip(names, vectors):
                self.tokenizer.add_tokens(name)
                weight[self.tokenizer.convert_tokens_to_ids(name)] = vector.to(weight.dtype)
        self._multi_vector[token] = " ".join(names)

    def uses(self, text: str, token: str) -> bool:
        return token in self.tokenizer.tokenize(text)

    def _spell_out(self, text: str) -> str:
        """diffusers' `maybe_convert_prompt`: a multi-vector token stands for all its tokens."""
        if not self._multi_vector:  # no embedding added: nothing to spell out (the --from-text path)
            return text
        for token in set(self.tokenizer.tokenize(text)):
            if token in self._multi_vector:
                text = text.replace(token, self._multi_vector[token])
        return text

    def encode(self, text: str, tokens: int) -> torch.Tensor:
        """[tokens, C]: the first `tokens` positions of diffusers' 77-position encoding of `text`."""
        hidden = encode_prompt(self.tokenizer, self.text_encoder, self._spell_out(text))  # (1, 77, C)
        return hidden[0, :tokens].float().cpu().clone()  # a tensor of its own (safetensors refuses shared storage)

    def count(self, text: str) -> int:
        return token_count(self.tokenizer, self._spell_out(text))
