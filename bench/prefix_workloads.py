"""The workloads of bench/prefix.py: seeded pseudo-English documents, and the requests built on them.

Every workload is a list of `Conversation`s: a system message (a document, or a conversation's notes) and one
or more user turns sent in order, each with the whole history before it (the model's earlier answers
included). Shared documents are one-turn conversations over the same few documents; multi-turn is a few
conversations of several turns; no sharing is one-turn conversations over documents used once.

The text is readable nonsense made from a fixed vocabulary by a seeded `random.Random`, so that a run is
reproducible and two runs with different seeds share no document (the engines' prefix caches cannot be
reset on the CPU build of vLLM, so each run gets documents of its own instead).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SUBJECTS = (
    "the river council",
    "a travelling merchant",
    "the old lighthouse keeper",
    "the northern farmers",
    "a young engineer",
    "the harbour master",
    "the village school",
    "a group of weavers",
    "the mountain guides",
    "the city archivist",
    "a retired sailor",
    "the bakers' guild",
)
VERBS = (
    "repaired",
    "measured",
    "described",
    "carried",
    "planted",
    "painted",
    "counted",
    "sold",
    "studied",
    "rebuilt",
    "questioned",
    "remembered",
)
OBJECTS = (
    "the wooden bridge",
    "seven barrels of grain",
    "a map of the valley",
    "the broken water wheel",
    "the winter stores",
    "a crate of copper lamps",
    "the eastern orchard",
    "the tax records",
    "a flock of grey sheep",
    "the bell of the chapel",
    "the stone wall by the road",
    "a letter from the capital",
)
TAILS = (
    "before the spring floods",
    "after a long dispute",
    "with great care",
    "during the harvest festival",
    "while the rain kept falling",
    "for the third time that year",
    "without telling anyone",
    "under a bright northern sky",
    "as the market opened",
    "in the presence of the mayor",
    "at the request of the elders",
    "because the old one had failed",
)
QUESTIONS = (
    "Who {verb} {obj}?",
    "What happened to {obj}?",
    "Why did {subj} act as they did?",
    "Summarise the part about {subj} in one sentence.",
    "When was {obj} mentioned first?",
    "What does the text say about {subj}?",
)
FOLLOW_UPS = (
    "Can you say more about that?",
    "And what happened next?",
    "Who else was involved?",
    "Is that consistent with the start of my notes?",
    "Give me one more detail from the notes.",
    "What would you ask {subj} about it?",
)


@dataclass(frozen=True)
class Conversation:
    """One client session: a system message and the user turns sent one after the other."""

    session: str
    """Sent as the request's `user` field (what session_affinity keys on)."""
    system: str
    turns: tuple[str, ...]


@dataclass(frozen=True)
class Workload:
    """A named list of conversations and how many requests may be in flight at once."""

    name: str
    conversations: tuple[Conversation, ...]
    concurrency: int = 4

    @property
    def requests(self) -> int:
        """How many chat completions the workload sends."""
        return sum(len(c.turns) for c in self.conversations)


@dataclass(frozen=True)
class Sizes:
    """The knobs of the three workloads (the defaults are the issue's; `quick()` is the smoke-test size)."""

    docs: int = 12
    questions_per_doc: int = 4
    doc_words: int = 1280
    conversations: int = 8
    turns: int = 5
    notes_words: int = 850
    unique_prompts: int = 20
    concurrency: int = 4

    @classmethod
    def quick(cls) -> Sizes:
        """A small version for checking the harness: a minute or two per round on the real engines."""
        return cls(docs=4, questions_per_doc=3, conversations=4, turns=3, unique_prompts=8)


def sentence(rng: random.Random) -> str:
    """One sentence of pseudo-English."""
    return f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}."


def document(rng: random.Random, words: int, title: str) -> str:
    """Paragraphs of sentences until about `words` words, under a title."""
    paragraphs: list[str] = []
    count = 0
    while count < words:
        paragraph = " ".join(sentence(rng) for _ in range(rng.randint(3, 6)))
        paragraphs.append(paragraph)
        count += len(paragraph.split())
    return f"{title}\n\n" + "\n\n".join(paragraphs)


def question(rng: random.Random, templates: tuple[str, ...] = QUESTIONS) -> str:
    """A question about the documents' recurring subjects and objects."""
    template = rng.choice(templates)
    return template.format(subj=rng.choice(SUBJECTS), verb=rng.choice(VERBS), obj=rng.choice(OBJECTS))


def shared_documents(seed: int, sizes: Sizes) -> Workload:
    """`docs` documents with `questions_per_doc` questions each, shuffled; every request has its own user."""
    rng = random.Random(seed)
    docs = [document(rng, sizes.doc_words, f"Document {seed}-{d}: a chronicle") for d in range(sizes.docs)]
    pairs = [(d, question(rng)) for d in range(sizes.docs) for _ in range(sizes.questions_per_doc)]
    rng.shuffle(pairs)
    conversations = tuple(
        Conversation(session=f"reader-{seed}-{i}", system=f"Answer from this document.\n\n{docs[d]}", turns=(q,))
        for i, (d, q) in enumerate(pairs)
    )
    return Workload("shared documents", conversations, sizes.concurrency)


def multi_turn(seed: int, sizes: Sizes) -> Workload:
    """`conversations` chats of `turns` turns over notes of their own (the session is the conversation)."""
    rng = random.Random(seed)
    conversations = []
    for c in range(sizes.conversations):
        notes = document(rng, sizes.notes_words, f"Notes {seed}-{c}")
        turns = (question(rng), *(question(rng, FOLLOW_UPS) for _ in range(sizes.turns - 1)))
        conversations.append(
            Conversation(
                session=f"chat-{seed}-{c}", system=f"You help the user with their notes.\n\n{notes}", turns=turns
            )
        )
    return Workload("multi-turn", tuple(conversations), sizes.concurrency)


def no_sharing(seed: int, sizes: Sizes) -> Workload:
    """`unique_prompts` one-turn requests, each over a document of its own: no prefix beyond the template."""
    rng = random.Random(seed)
    conversations = tuple(
        Conversation(
            session=f"solo-{seed}-{i}",
            system=f"Answer from this document.\n\n{document(rng, sizes.doc_words, f'Report {seed}-{i}')}",
            turns=(question(rng),),
        )
        for i in range(sizes.unique_prompts)
    )
    return Workload("no sharing", conversations, sizes.concurrency)


WORKLOADS = {"shared": shared_documents, "multiturn": multi_turn, "nosharing": no_sharing}
"""The workload builders by command-line name, each `(seed, sizes) -> Workload`."""
