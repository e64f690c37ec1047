"""Distilling a completed workflow into what is worth remembering.

A ``Distiller`` turns a finished workflow (its input, final state and transcript)
into ``Distilled``: a summary of the resolved issue and the facts it taught
(preferences, constraints, outcomes, plain facts), each from one message. A fact's
``key`` is a stable subject slot (``preference:contact-channel``), so a later fact
that contradicts it lands on the same key and the memory gate updates it.

Two implementations: ``ModelDistiller`` asks the language model (structured
output); ``RuleDistiller`` is deterministic and offline, reading the customer's
own sentences ("I prefer ...", "please never ...", "my ... is ...").
``distiller_for`` picks the model one only for a real (OpenAI-compatible) model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.models.llm import LanguageModel, ModelRequest, OpenAIModel

FactKind = Literal["preference", "constraint", "outcome", "fact"]


class Fact(BaseModel):
    """One thing learnt: its kind, its subject slot, what it says, how sure, and the
    transcript message it came from (None: the workflow as a whole)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: FactKind
    key: str = Field(min_length=1, max_length=200)
    content: str = Field(min_length=1, max_length=2000)
    confidence: float = Field(ge=0, le=1)
    message_id: int | None = None


class Distilled(BaseModel):
    """A completed workflow, distilled: a summary of the issue and the facts it taught."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    summary: str
    facts: list[Fact] = Field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Line:
    """One transcript message: its id (provenance), role, author and text."""

    id: int
    role: str  # 'customer', 'agent' or 'system'
    author: str
    content: str


@dataclass(frozen=True, slots=True)
class Finished:
    """What a distiller reads of a completed workflow."""

    input: Mapping[str, Any]  # the validated pipeline input (JSON)
    state: Mapping[str, Any]  # the final workflow state
    transcript: Sequence[Line]


class Distiller(Protocol):
    """Turns a completed workflow into a summary and facts; ``name`` is recorded with them."""

    name: str

    async def distill(self, work: Finished) -> Distilled:
        """The summary and facts of ``work``."""
        ...


def distiller_for(model: LanguageModel) -> Distiller:
    """The model distiller for a real model; the offline rules otherwise."""
    if isinstance(model, OpenAIModel):
        return ModelDistiller(model)
    return RuleDistiller()


# --- the language model -------------------------------------------------------------

INSTRUCTIONS = """You curate a customer's long-term memory from one resolved conversation.
Return a one or two sentence summary of the issue and how it was resolved, and the facts
worth remembering about the customer: preferences, constraints (things to always or
never do, allergies, restrictions), the outcome (what resolved the issue) and durable
facts ("my plan is ..."). Only what the customer said or what clearly happened; no
guesses. key: a stable slot naming the subject, kind-prefixed, lowercase with dashes
(e.g. "preference:contact-channel"), the same slot for a fact that replaces another.
confidence: 0 to 1. message_id: the id of the message the fact comes from, or null."""


class _ModelFact(BaseModel):
    # No bounds or defaults: structured outputs in strict mode accept neither.
    kind: FactKind
    key: str
    content: str
    confidence: float
    message_id: int | None


class _ModelDistilled(BaseModel):
    summary: str
    facts: list[_ModelFact]


class ModelDistiller:
    """Distils with the language model (``purpose="consolidate"``)."""

    def __init__(self, model: LanguageModel) -> None:
        self.model = model
        self.name = f"model:{model.name}"

    async def distill(self, work: Finished) -> Distilled:
        """Ask the model; message ids it invents are dropped, confidences clamped to 0..1."""
        content = json.dumps(
            {
                "input": work.input,
                "final_state": _trim(work.state),
                "transcript": [
                    {"id": m.id, "role": m.role, "author": m.author, "text": m.content}
                    for m in work.transcript
                ],
            },
            default=str,
        )
        answer = await self.model.complete(
            ModelRequest(purpose="consolidate", instructions=INSTRUCTIONS, content=content),
            _ModelDistilled,
        )
        ids = {m.id for m in work.transcript}
        facts = [
            Fact(
                kind=f.kind,
                key=_slot(f.key.partition(":")[2] or f.key, f.kind),
                content=f.content.strip()[:2000],
                confidence=min(max(f.confidence, 0.0), 1.0),
                message_id=f.message_id if f.message_id in ids else None,
            )
            for f in answer.value.facts
            if f.content.strip()
        ]
        return Distilled(summary=answer.value.summary.strip(), facts=facts)


def _trim(state: Mapping[str, Any], limit: int = 4000) -> Any:
    """The state as sent to the model: whole when small, else its text cut at ``limit``."""
    text = json.dumps(state, default=str)
    return state if len(text) <= limit else text[:limit]


# --- the offline rules --------------------------------------------------------------

_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"[a-z0-9]+")
_HEDGE = re.compile(r"\b(i think|maybe|perhaps|probably|might|not sure|i guess)\b", re.I)
_CHANNELS = {
    "email": "email",
    "e-mail": "email",
    "mail": "email",
    "phone": "phone",
    "call": "phone",
    "calls": "phone",
    "sms": "text message",
    "text": "text message",
    "texts": "text message",
    "chat": "chat",
    "whatsapp": "chat",
}
_DIETS = (
    "vegan",
    "vegetarian",
    "pescatarian",
    "gluten-free",
    "gluten free",
    "lactose intolerant",
    "diabetic",
    "kosher",
    "halal",
)
_SUBJECT_FIELDS = ("subject", "title", "topic", "summary", "question", "name")
_STOP = frozenset(
    "a an the to be by for of on in at with my me i it is are and or that this".split()
)
_DO_NOT = re.compile(
    r"\b(?:don't|do not|never)\s+(call|email|e-mail|text|contact|message|phone)\b", re.I
)
_ALLERGY = re.compile(r"\bi(?:'m| am)\s+(allergic to\s+[a-z -]+)", re.I)
_DIET = re.compile(r"\bi(?:'m| am)\s+(?:a\s+)?(" + "|".join(_DIETS) + r")\b", re.I)
# (pattern, kind, confidence); the pattern's group 1 is the subject the slot is named after.
_RULES: tuple[tuple[re.Pattern[str], FactKind, float], ...] = (
    (_DO_NOT, "constraint", 0.9),
    (_ALLERGY, "constraint", 0.95),
    (_DIET, "constraint", 0.9),
    (re.compile(r"\bplease\s+never\s+(.+)", re.I), "constraint", 0.85),
    (re.compile(r"\bplease\s+always\s+(.+)", re.I), "preference", 0.85),
    (re.compile(r"\bi(?:'d| would)?\s*(?:prefer|like to be)\s+(.+)", re.I), "preference", 0.85),
    (re.compile(r"\bmy\s+([a-z][a-z -]{0,30}?)\s+(?:is|are)\s+(.+)", re.I), "fact", 0.8),
)


class RuleDistiller:
    """The offline distiller: deterministic rules over the customer's sentences."""

    name = "offline-rules-v1"

    async def distill(self, work: Finished) -> Distilled:
        """See the module docstring; the same workflow always gives the same result."""
        return distill_offline(work)


def distill_offline(work: Finished) -> Distilled:
    """The summary (the subject, then the final reply's first sentence), the customer's
    stated preferences, constraints and facts, and the outcome (the final reply)."""
    subject = _subject(work.input)
    reply = next((m for m in reversed(work.transcript) if m.role == "agent"), None)
    resolution = _first_sentence(reply.content) if reply else ""
    summary = f"{subject}: {resolution}" if subject and resolution else subject or resolution
    facts: dict[str, Fact] = {}  # by key: a later statement of the customer wins
    for message_id, sentence in _customer_sentences(work):
        fact = _fact(sentence, message_id)
        if fact is not None:
            facts[fact.key] = fact
    if resolution:
        topic = _slug(subject or resolution, words=5)
        facts[f"outcome:{topic}"] = Fact(
            kind="outcome",
            key=f"outcome:{topic}",
            content=f"{subject} — resolved: {resolution}" if subject else resolution,
            confidence=0.7,
            message_id=reply.id if reply else None,
        )
    return Distilled(summary=summary or "(no summary)", facts=list(facts.values()))


def _customer_sentences(work: Finished) -> Iterator[tuple[int, str]]:
    """The customer's sentences with their message ids. The first customer message is
    the submitted input rendered as text: its sentences are read from the input's own
    text fields instead (JSON or a model's repr would garble them)."""
    first = True
    for line in work.transcript:
        if line.role != "customer":
            continue
        texts = list(_strings(work.input)) if first else [line.content]
        first = False
        for text in texts:
            for sentence in _SENTENCE.split(text):
                if sentence.strip():
                    yield line.id, sentence.strip()


def _fact(sentence: str, message_id: int) -> Fact | None:
    for pattern, kind, confidence in _RULES:
        match = pattern.search(sentence)
        if match is None:
            continue
        if _HEDGE.search(sentence):
            confidence = 0.4  # "I think I prefer ...": below the gate's default floor
        return Fact(
            kind=kind,
            key=_key(kind, match),
            content=sentence[:2000],
            confidence=confidence,
            message_id=message_id,
        )
    return None


def _key(kind: FactKind, match: re.Match[str]) -> str:
    subject = match.group(1).lower()
    if match.re is _DO_NOT:
        return f"constraint:no-{_slug(_CHANNELS.get(subject, 'contact'))}"
    if match.re is _ALLERGY:
        return f"constraint:allergy-{_slug(subject.removeprefix('allergic to'), words=2)}"
    if match.re is _DIET:
        return "constraint:diet"
    words = _WORD.findall(subject)
    if kind == "preference" and any(w in _CHANNELS for w in words):
        return "preference:contact-channel"
    return _slot(subject, kind)


def _slot(subject: str, kind: str) -> str:
    return f"{kind}:{_slug(subject, words=3)}"


def _slug(text: str, *, words: int = 3) -> str:
    kept = [w for w in _WORD.findall(text.lower()) if w not in _STOP][:words]
    return "-".join(kept) or "general"


def _subject(value: Mapping[str, Any]) -> str:
    for name in _SUBJECT_FIELDS:
        found = value.get(name)
        if isinstance(found, str) and found.strip():
            return _first_sentence(found)[:200]
    first = next(_strings(value), "")
    return _first_sentence(first)[:200]


def _first_sentence(text: str) -> str:
    """The first sentence of ``text`` that says something: a salutation line ("Hi Ann,",
    "Hello,") is skipped."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and _SALUTATION.match(lines[0]):
        text = "\n".join(lines[1:])
    return next((s.strip() for s in _SENTENCE.split(text) if s.strip()), "")


_SALUTATION = re.compile(
    r"^\s*(hi|hello|hey|dear|good (morning|afternoon|evening))\b[^.!?]*,\s*$", re.I
)


def _strings(value: Any) -> Iterator[str]:
    """Every text in a JSON value, in order (dictionary values, list items)."""
    if isinstance(value, str):
        if value.strip():
            yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)
