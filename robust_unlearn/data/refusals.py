"""Refusal answers for IdkDPO's preferred response (written for this project; open-unlearning draws
its own from a file on the hub, ``open-unlearning/idk``). Each question gets one, chosen by a hash of
the question, so a run is reproducible."""
from __future__ import annotations

import hashlib

REFUSALS = (
    "I don't know the answer to that.",
    "I'm not able to answer that question.",
    "I have no information about that.",
    "That is something I can't tell you.",
    "I'm not sure; I don't have details on that.",
    "I can't recall anything about that.",
    "I don't have an answer for that one.",
    "Sorry, that's outside what I know.",
    "I have no reliable knowledge of that.",
    "I couldn't say.",
    "I'm unable to provide that information.",
    "Nothing I know answers that question.",
    "I don't have any record of that.",
    "That's not something I know about.",
    "I'd be guessing, so I won't answer that.",
    "I'm afraid I don't know.",
)


def refusal_for(question: str) -> str:
    h = int(hashlib.sha256(question.encode("utf-8")).hexdigest()[:8], 16)
    return REFUSALS[h % len(REFUSALS)]
