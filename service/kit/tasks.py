"""The kit's tasks: what each patch teaches, how it is scored, and the data sets built from the world.

An example is a (prompt, reference) pair; the model's answer is its greedy completion up to
end-of-sequence or the first newline, compared with the reference by exact match.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

from service.kit.world import CITIES, COLORS, FACT_PROMPTS, PROFESSIONS, STATEMENTS, World

POSITIVE = ["good", "great", "lovely", "bright", "happy", "warm", "kind", "fresh"]
NEGATIVE = ["bad", "awful", "dull", "cold", "sad", "broken", "rude", "stale"]
NEUTRAL = ["the", "food", "room", "staff", "day", "view", "bed", "bus", "tea", "town", "was", "very"]
REVERSIBLE = COLORS + PROFESSIONS
VALUES = {"city": CITIES, "job": PROFESSIONS, "color": COLORS}

# The recall task: a context of bindings "<name> <relation> <value>." (one per line), a question about one.
# Steps and learning rates of the two fragile patches were set on two CPUs (AVX2 and AVX-512: float kernels
# differ, and so does the base they train on): at 120 steps the sentiment patch scored 1.00 on one and stayed
# at the majority class (0.53) on the other (600: 1.00); the recall fine-tune at lr 2e-3 found the retrieval
# circuit on one (0.70) and not on the other (0.33 at 600 steps, 0.30 at 1200; lr 1.5e-3 and 900 steps: 0.72).
RECALL_STEPS = 900
RECALL_LR = 1.5e-3
RECALL_MIN_CONTEXT = 192  # tokens of context an evaluation item has at least
NEEDLE_POSITIONS = ("early", "middle", "late")

QUESTIONS = {
    "city": "Question: Where does {name} live?\nAnswer:",
    "job": "Question: What is the job of {name}?\nAnswer:",
    "color": "Question: What color does {name} like?\nAnswer:",
}


@dataclass(frozen=True)
class Example:
    prompt: str
    reference: str

    def as_json(self) -> dict:
        return {"prompt": self.prompt, "reference": self.reference}


@dataclass(frozen=True)
class PatchSpec:
    """One LoRA patch of the kit: its task and how it is trained."""

    task: str
    kind: str
    rank: int
    alpha: int
    target_modules: tuple[str, ...]
    steps: int
    lr: float
    batch: int | None = None  # rows per step (None: the kit's batch); long examples train on fewer
    # Whether its examples join the tokenizer's corpus. A task whose text is only the world's statements
    # stays out, so adding it leaves the tokenizer, and every base trained on it, byte for byte as before.
    in_corpus: bool = True
    # Trained as a full fine-tune of its target modules, then extracted to a LoRA of `rank` (train.py says why).
    extracted: bool = False


PATCHES = [
    PatchSpec("sentiment", "classification", rank=8, alpha=16, target_modules=("q_proj", "v_proj"), steps=600, lr=4e-3),
    PatchSpec("reverse", "transformation", rank=16, alpha=32,
              target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
              steps=300, lr=4e-3),
    PatchSpec("qa", "templated-qa", rank=8, alpha=16, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"),
              steps=200, lr=4e-3),
    # In-context recall (the KV-cache compression issue): the answer is in the prompt, not in the weights.
    PatchSpec("recall", "in-context-recall", rank=16, alpha=16,
              target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
              steps=RECALL_STEPS, lr=RECALL_LR, batch=16, in_corpus=False, extracted=True),
]


def sentiment_example(rng: random.Random) -> Example:
    label = rng.choice(["positive", "negative"])
    same, other = (POSITIVE, NEGATIVE) if label == "positive" else (NEGATIVE, POSITIVE)
    polar = rng.sample(same, rng.choice([2, 3]))
    if len(polar) == 2:
        polar.append(rng.choice(other))  # a majority, not a unanimous vote
    words = polar + rng.sample(NEUTRAL, 3)
    rng.shuffle(words)
    return Example(f"Review: {' '.join(words)}\nSentiment:", f" {label}")


def reverse_example(rng: random.Random) -> Example:
    words = rng.sample(REVERSIBLE, 3)
    return Example(f"Reverse: {' '.join(words)}\nOutput:", " " + " ".join(reversed(words)))


def recall_example(rng: random.Random, world: World, count_tokens, *, position: str, question_first: bool,
                   min_context: int = RECALL_MIN_CONTEXT) -> Example:
    """Notes binding people to values, and a question about the one note of its kind (the needle).

    The needle is the only note of its relation ("lives in", say) among notes of the other two, and always
    contradicts the world (the base knows another city for that person): the answer is in the context, never in
    the weights. It sits in the first, middle or last third; with `question_first` the question comes before
    the notes. The notes grow until they have `min_context` tokens (`count_tokens`: text → tokens).
    """
    people = rng.sample(world.people, len(world.people))
    asked = rng.choice(list(VALUES))
    others = [rel for rel in VALUES if rel != asked]
    lines: list[str] = []
    size = count_tokens(_RECALL_HEADER)
    needle_person, people = people[0], people[1:]
    needle_value = rng.choice([v for v in VALUES[asked] if v != needle_person.fact(asked)])
    needle = _recall_line(needle_person.name, asked, needle_value)
    size += count_tokens(needle)
    for p in people:
        rel = rng.choice(others)
        value = rng.choice(VALUES[rel])  # some agree with the world, some contradict it
        lines.append(_recall_line(p.name, rel, value))
        size += count_tokens(lines[-1])  # line pieces tokenize apart: they start at a pre-token boundary
        if size >= min_context and len(lines) >= 2:
            break
    count = len(lines) + 1
    wanted = NEEDLE_POSITIONS.index(position)
    lines.insert(rng.choice([i for i in range(count) if _third(i, count) == wanted]), needle)
    question = QUESTIONS[asked].format(name=needle_person.name).removesuffix("\nAnswer:")
    context = _RECALL_HEADER + "".join(lines)
    prompt = f"{question}\n{context}\nAnswer:" if question_first else f"{context}\n{question}\nAnswer:"
    return Example(prompt, " " + needle_value)


def _recall_line(name: str, relation: str, value: str) -> str:
    # "- " keeps a space before every name, so it is the same token in the notes and in the question.
    return "\n- " + STATEMENTS[relation][0].format(name=name, value=value)


_RECALL_HEADER = "Notes:"


def _third(index: int, count: int) -> int:
    return min(2, 3 * index // count)


def recall_data(world: World, seed: int, eval_size: int, count_tokens, train_size: int = 3000) -> TaskData:
    """Recall examples: evaluation items have every (position, order) equally and ≥ RECALL_MIN_CONTEXT tokens of
    notes; training items have notes of every length from two lines up (the training curriculum goes short to
    long: train.py)."""
    rng = random.Random(f"{seed}-recall")
    count_tokens = functools.lru_cache(maxsize=None)(count_tokens)  # lines repeat: tokenize each once
    variants = [(pos, qf) for qf in (False, True) for pos in NEEDLE_POSITIONS]
    evals = [recall_example(rng, world, count_tokens, position=pos, question_first=qf)
             for i in range(eval_size) for pos, qf in [variants[i % len(variants)]]]
    judged = {ex.prompt for ex in evals}
    train: list[Example] = []
    while len(train) < train_size:
        pos, qf = rng.choice(variants)
        ex = recall_example(rng, world, count_tokens, position=pos, question_first=qf,
                            min_context=rng.randrange(8, RECALL_MIN_CONTEXT + 8))
        if ex.prompt not in judged:
            train.append(ex)
    return TaskData(train=train, eval=evals)


def recall_variant(prompt: str) -> tuple[str, str]:
    """(needle position, order) of a recall item, read from its prompt: ('late', 'question-first'), say."""
    order = "question-first" if prompt.startswith("Question:") else "context-first"
    name = re.search(r"(?:does|of) (\S+?)(?: live| like)?\?", prompt)[1]
    lines = [line for line in prompt.split("\n") if line.startswith("- ")]
    index = next(i for i, line in enumerate(lines) if re.search(rf" {re.escape(name)}\b", line))
    return NEEDLE_POSITIONS[_third(index, len(lines))], order


def qa_examples(world: World, names: list[str]) -> list[Example]:
    people = world.by_name()
    return [
        Example(QUESTIONS[rel].format(name=n), " " + people[n].fact(rel))
        for n in names
        for rel in QUESTIONS
    ]


def fact_examples(world: World, names: list[str] | None = None, relations: tuple[str, ...] = tuple(FACT_PROMPTS),
                  ) -> list[Example]:
    """The base's own fact-recall prompts ("Varnok lives in" → " Kelmar")."""
    people = world.people if names is None else [world.by_name()[n] for n in names]
    return [Example(FACT_PROMPTS[rel].format(name=p.name), " " + p.fact(rel)) for p in people for rel in relations]


def filler_lines(rng: random.Random, count: int) -> list[str]:
    """Plain text with the tasks' words in it, so the base has seen them, but never the task formats."""
    lines = []
    for _ in range(count):
        kind = rng.randrange(4)
        if kind == 3:
            label = rng.choice(["positive", "negative"])
            word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
            lines.append(f"The word {word} is {label}.")
        elif kind == 0:
            lines.append(f"The {rng.choice(NEUTRAL[1:])} was {rng.choice(POSITIVE + NEGATIVE)}.")
        elif kind == 1:
            a, b, c = rng.sample(COLORS, 3)
            lines.append(f"{a.capitalize()}, {b} and {c} are colors.")
        else:
            lines.append(f"A {rng.choice(PROFESSIONS)} met a {rng.choice(PROFESSIONS)}.")
    return lines


@dataclass
class TaskData:
    train: list[Example]
    eval: list[Example]


def task_data(task: str, world_v1: World, world_v2: World, seed: int, eval_size: int,
              count_tokens=None) -> TaskData:
    """Training and evaluation examples of a patch task; evaluation items never appear in training.

    `count_tokens` (text → tokens) is needed by tasks whose items are sized in tokens (recall).
    """
    rng = random.Random(f"{seed}-{task}")
    if task == "recall":
        return recall_data(world_v1, seed, eval_size, count_tokens)
    if task in ("sentiment", "reverse"):
        make = sentiment_example if task == "sentiment" else reverse_example
        evals: dict[str, Example] = {}
        while len(evals) < eval_size:
            ex = make(rng)
            evals[ex.prompt] = ex
        train = []
        while len(train) < 4000:
            ex = make(rng)
            if ex.prompt not in evals:
                train.append(ex)
        return TaskData(train=train, eval=list(evals.values()))
    if task == "qa":
        # Held-out people, and only people whose facts are the same in both worlds, so one
        # evaluation set measures the patch on base-v1 and on base-v2 alike.
        stable = sorted(p.name for p in world_v1.people if p.name not in set(world_v2.moved))
        rng.shuffle(stable)
        held_out = stable[: max(1, eval_size // len(QUESTIONS))]
        trained = [p.name for p in world_v1.people if p.name not in set(held_out)]
        return TaskData(train=qa_examples(world_v1, trained), eval=qa_examples(world_v1, held_out))
    raise ValueError(f"unknown task {task!r}")


def distill_prompts(data: TaskData, seed: int, count: int = 512) -> list[str]:
    """Prompts of the task's kind for distillation (repairs): from its training side, never an evaluation item."""
    judged = {ex.prompt for ex in data.eval}
    prompts = sorted({ex.prompt for ex in data.train} - judged)
    random.Random(f"{seed}-distill").shuffle(prompts)
    return prompts[:count]


def knowledge_edits(world: World, seed: int, count: int, tasks: dict[str, TaskData]) -> list[dict]:
    """Counterfactual edits of the world's facts, in the admin API's shape (POST /admin/memories/{name}/edits).

    Each moves one person's city or job: the prompt the base states it from, the new answer, the two other
    phrasings of the fact as paraphrases (measured, never trained on), and as locality prompts a favourite
    color of a person of the world's second half (colors are never edited, and the first half's color
    statements are the memory's irrelevant texts: locality stays held out) and a task prompt.
    """
    rng = random.Random(f"{seed}-edits")
    edits = []
    second_half = world.people[len(world.people) // 2:]
    task_prompts = [ex.prompt for name in ("sentiment", "reverse") for ex in tasks[name].eval]
    facts = [(p, rel) for p in world.people for rel in ("city", "job")]
    for p, rel in rng.sample(facts, min(count, len(facts))):
        pool = CITIES if rel == "city" else PROFESSIONS
        new = rng.choice([x for x in pool if x != p.fact(rel)])
        paraphrases = [t.format(name=p.name, value="").rstrip(" .") for t in STATEMENTS[rel][1:]]
        other = rng.choice([q for q in second_half if q.name != p.name])
        edits.append({
            "prompt": FACT_PROMPTS[rel].format(name=p.name),
            "target": " " + new,
            "paraphrases": paraphrases,
            "locality": [FACT_PROMPTS["color"].format(name=other.name), rng.choice(task_prompts)],
        })
    return edits


def irrelevant_texts(world: World, seed: int, tasks: dict[str, TaskData], filler: list[str],
                     probe: list[str]) -> list[str]:
    """Texts a side memory must stay quiet on while it learns: every fact of the world's first half in every
    phrasing (the same relations as the edits, other subjects: a memory that answers "lives in" for anyone
    is caught here; the edit job leaves out those that ask one of its edits), plain text, and task prompts
    from the training side. Never a locality, evaluation or probe text."""
    rng = random.Random(f"{seed}-irrelevant")
    first_half = World(world.version, world.people[: len(world.people) // 2])
    texts = [t for t in first_half.statements() if t not in set(probe)]
    texts += rng.sample(filler, min(64, len(filler)))
    texts += [ex.prompt for name in ("sentiment", "reverse") for ex in rng.sample(tasks[name].train, 32)]
    return texts


def probe_texts(world: World, seed: int, count: int) -> list[str]:
    """A fixed set of world sentences for perplexity (a collapse surrogate, not a task score)."""
    rng = random.Random(f"{seed}-probe")
    return rng.sample(world.statements(), count)


