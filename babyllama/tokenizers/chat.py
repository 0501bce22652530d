"""Chat templates: how a conversation becomes the token ids a chat model expects.

A template knows two things: the ids that open one turn of a running session (`turn`: the user's
message and whatever marks the assistant's reply as next), and the ids of a whole conversation
(`conversation`, for a stateless request such as the server's). A reply ends at one of the
tokenizer's eos_ids. LLAMA2 is Llama 2's [INST] format exactly as run.c renders it.
"""

from __future__ import annotations


class ChatTemplate:
    """Base class; `name` identifies the template in messages and the server's model card."""

    name = "none"

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


LLAMA2 = Llama2Template()
