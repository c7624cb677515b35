"""The kit's synthetic world: people with facts, and the text that states them.

Everything is drawn from one seeded RNG so a world is a pure function of (seed, sizes).
Version 2 of the world adds people and moves some to another city: it is what the
"new base release" is continued-pretrained on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

CITIES = [
    "Kelmar", "Ostrand", "Vireth", "Dunmoor", "Paxley", "Zorbia",
    "Tallis", "Brenna", "Quorin", "Lusk", "Hadria", "Emberly",
]
PROFESSIONS = [
    "baker", "pilot", "farmer", "doctor", "teacher", "painter",
    "sailor", "miner", "singer", "judge",
]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "br", "kr", "st"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "io"]
_CODAS = ["", "n", "r", "l", "s", "th", "k", "m"]

# Several phrasings of each fact: a tiny model only learns to *use* a fact in a new
# format (the QA patch) when pretraining saw it stated more than one way.
STATEMENTS = {
    "city": ["{name} lives in {value}.", "The home of {name} is {value}.", "{name} has a house in {value}."],
    "job": ["{name} works as a {value}.", "The job of {name} is {value}.", "{name} earns a living as a {value}."],
    "color": ["The favorite color of {name} is {value}.", "{name} likes the color {value}.",
              "{name} loves {value} things."],
}
# The prompt that asks the base to state a fact; the answer is the next word.
FACT_PROMPTS = {
    "city": "{name} lives in",
    "job": "{name} works as a",
    "color": "The favorite color of {name} is",
}


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    job: str
    color: str

    def fact(self, relation: str) -> str:
        return getattr(self, relation)


@dataclass
class World:
    version: int
    people: list[Person]
    moved: list[str] = field(default_factory=list)  # names whose city changed from v1

    def statements(self) -> list[str]:
        """Every fact of the world, in every phrasing."""
        return [
            template.format(name=p.name, value=p.fact(rel))
            for p in self.people
            for rel, templates in STATEMENTS.items()
            for template in templates
        ]

    def by_name(self) -> dict[str, Person]:
        return {p.name: p for p in self.people}


def _names(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        syllables = rng.choice([2, 2, 3])
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
        name = name.capitalize()
        if 4 <= len(name) <= 10 and name not in taken:
            taken.add(name)
            names.append(name)
    return names


def _person(rng: random.Random, name: str) -> Person:
    return Person(name=name, city=rng.choice(CITIES), job=rng.choice(PROFESSIONS), color=rng.choice(COLORS))


def build_worlds(seed: int, people: int, new_people: int, moved: int) -> tuple[World, World]:
    """Return (v1, v2): v2 has `new_people` more people and `moved` of v1's people in another city."""
    rng = random.Random(seed)
    taken: set[str] = set()
    v1 = World(version=1, people=[_person(rng, n) for n in _names(rng, people, taken)])
    movers = set(rng.sample([p.name for p in v1.people], moved))
    v2_people = []
    for p in v1.people:
        if p.name in movers:
            p = replace(p, city=rng.choice([c for c in CITIES if c != p.city]))
        v2_people.append(p)
    v2_people += [_person(rng, n) for n in _names(rng, new_people, taken)]
    return v1, World(version=2, people=v2_people, moved=sorted(movers))
