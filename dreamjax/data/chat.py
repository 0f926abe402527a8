"""The conversation template upstream trains and prompts with (FastChat's vicuna_v1.1,
omni/conversation/conversation.py), used by the conversation layouts and by every chat prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ConvTemplate:
    """A FastChat-style ADD_COLON_TWO conversation template (omni/conversation/conversation.py)."""

    name: str
    system_message: str
    roles: tuple[str, str]
    sep: str  # after a user turn
    sep2: str  # after an assistant turn

    def prompt(self, turns: Sequence[tuple[str, str | None]], system_message: str | None = None) -> str:
        """`system + sep`, then `ROLE: text` + sep/sep2 alternately; a turn with text None gives `ROLE:`.

        Roles alternate USER/ASSISTANT by position, whatever the record's role names (upstream
        `reset_dialog`). A final `(role, None)` turn leaves the prompt open for generation.
        """
        system = self.system_message if system_message is None else system_message
        seps = (self.sep, self.sep2)
        out = system + seps[0]
        for i, (_role, text) in enumerate(turns):
            role = self.roles[i % 2]
            out += f"{role}: {text}{seps[i % 2]}" if text is not None else f"{role}:"
        return out


VICUNA_V1_1 = ConvTemplate(
    name="vicuna_v1.1",
    system_message=(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    roles=("USER", "ASSISTANT"),
    sep=" ",
    sep2="</s>",
)
