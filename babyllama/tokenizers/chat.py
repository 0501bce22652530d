"""Chat templates: how a conversation becomes the token ids a chat model expects.

A template knows two things: the ids that open one turn of a running session (`turn`: the user's
message and whatever marks the assistant's reply as next), and the ids of a whole conversation
(`conversation`, for a stateless request such as the server's). A reply ends at one of the
tokenizer's eos_ids (and, for templates that mark a turn's end in text, at `stop_text`).
LLAMA2 is Llama 2's [INST] format exactly as run.c renders it; CHATML is OpenAI's ChatML.
"""

from __future__ import annotations


class ChatTemplate:
    """Base class; `name` identifies the template in messages and the server's model card."""

    name = "none"
    stop_text: str | None = None  # text that ends a reply, for vocabularies without the token

    def turn(self, tokenizer, user: str, system: str | None, first: bool) -> list[int]:
        raise NotImplementedError

    def conversation(self, tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        raise NotImplementedError


class Llama2Template(ChatTemplate):
    """Llama 2's chat format as run.c renders it: each user turn is encoded on its own, with BOS:
    "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]" for the first turn (without the SYS
    block when there is no system prompt), "[INST] {user} [/INST]" after; the reply ends at EOS."""

    name = "llama2"

    @staticmethod
    def text(user: str, system: str | None, first: bool) -> str:
        if first and system:
            return f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]"
        return f"[INST] {user} [/INST]"

    def turn(self, tokenizer, user, system, first):
        return tokenizer.encode(self.text(user, system, first), bos=True)

    def conversation(self, tokenizer, messages, add_generation_prompt=True):
        """What a run.c chat session feeds for these messages: every user turn as `turn` gives it,
        every assistant reply followed by EOS. A system message applies to the first user turn."""
        ids, system, first = [], None, True
        for m in messages:
            role, content = m["role"], m["content"]
            if role == "system":
                system = content
            elif role == "user":
                ids += self.turn(tokenizer, content, system, first)
                first = False
            else:  # assistant
                ids += tokenizer.encode(content, bos=False) + [tokenizer.eos_ids[0]]
        return ids


class ChatMLTemplate(ChatTemplate):
    """ChatML: "<|im_start|>{role}\n{content}<|im_end|>\n" per message, then "<|im_start|>assistant\n".
    With a vocabulary that has no <|im_end|> token (tokenizer.bin) the markers are plain text, and
    a reply ends at EOS or when its text reaches "<|im_end|>"."""

    name = "chatml"
    stop_text = "<|im_end|>"

    @staticmethod
    def text(messages: list[dict], add_generation_prompt: bool = True) -> str:
        out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def turn(self, tokenizer, user, system, first):
        messages = ([{"role": "system", "content": system}] if first and system else []) + \
                   [{"role": "user", "content": user}]
        return tokenizer.encode(self.text(messages), bos=first)

    def conversation(self, tokenizer, messages, add_generation_prompt=True):
        return tokenizer.encode(self.text(messages, add_generation_prompt), bos=True)


LLAMA2 = Llama2Template()
CHATML = ChatMLTemplate()
TEMPLATES = {t.name: t for t in (LLAMA2, CHATML)}
