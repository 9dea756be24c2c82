"""The embedded default corpus: short English-like stories generated deterministically by code.

Why generated and not shipped: a few hundred KB of text is produced in well under a second from the
word lists below, the repository stays small, and the text is identical on every machine (a seeded
``random.Random``, no global state), so the tokenizer cache key and the measured losses are stable.

The grammar is a small story grammar in the spirit of TinyStories: characters, places, a problem,
a helper, a resolution and a moral, plus a few other registers (dialogue, simple facts, counting,
instructions) so that a tiny GPT-2 learns syntax, agreement (he/she/they), entity repetition and
simple arithmetic-like regularities within about a minute of CPU training.
"""

from __future__ import annotations

import functools
import hashlib
import random

# Bump when the generator changes: it is part of the tokenizer cache key.
CORPUS_VERSION = 1
DEFAULT_NUM_DOCUMENTS = 1600
DEFAULT_SEED = 1234

NAMES = {
    "she": ["Lily", "Mia", "Emma", "Sara", "Anna", "Zoe", "Ruby", "Lucy", "Nora", "Ella", "Maya", "Ivy"],
    "he": ["Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Finn", "Omar", "Theo", "Noah", "Eli", "Kai"],
}
ANIMALS = ["cat", "dog", "bird", "fox", "rabbit", "bear", "duck", "frog", "mouse", "owl", "turtle", "horse"]
ADJECTIVES = ["little", "happy", "brave", "shy", "curious", "tiny", "kind", "silly", "clever", "sleepy"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "white", "black"]
OBJECTS = [
    "ball", "kite", "book", "hat", "box", "drum", "cup", "boat", "key", "shoe", "map", "lamp",
    "toy car", "blanket", "basket", "flower", "shell", "stone", "bell", "scarf",
]  # fmt: skip
PLACES = [
    "park", "garden", "forest", "beach", "kitchen", "school", "farm", "river", "hill", "village",
    "library", "market", "pond", "meadow", "playground",
]  # fmt: skip
FOODS = ["apple", "cookie", "cake", "pear", "sandwich", "carrot", "banana", "muffin", "soup", "pie"]
ACTIVITIES = [
    "play with a ball", "draw pictures", "sing songs", "run in the grass", "read books", "build towers",
    "dance in the rain", "look at the stars", "collect shells", "climb trees", "bake cookies",
    "ride a bike", "fly a kite", "splash in puddles", "plant seeds",
]  # fmt: skip
FEELINGS = ["happy", "sad", "scared", "angry", "tired", "proud", "worried", "excited", "surprised", "calm"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy", "snowy", "foggy"]
TIMES = ["One day", "One morning", "One evening", "Later that day", "The next day", "After lunch"]
PROBLEMS = [
    ("lost", "{pos} {obj}", "could not find it anywhere"),
    ("broke", "{pos} {obj}", "did not know how to fix it"),
    ("dropped", "{pos} {obj} in the {place}", "could not reach it"),
    ("forgot", "{pos} {obj} at the {place}", "had to go back"),
]
HELPS = [
    "{helper} helped {obj_pron} look under the bench, and there it was.",
    "{helper} showed {obj_pron} how to fix it with some tape.",
    "{helper} used a long stick to get it back.",
    "{helper} walked with {obj_pron} all the way to the {place} to get it.",
]
MORALS = [
    "It is good to ask for help when you need it.",
    "Friends make hard days easier.",
    "Being patient is better than being angry.",
    "Sharing makes everyone happy.",
    "It is good to be kind to others.",
    "Trying again is how you learn.",
]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
PRONOUNS = {
    "she": {"sub": "she", "obj": "her", "pos": "her", "Sub": "She", "Pos": "Her"},
    "he": {"sub": "he", "obj": "him", "pos": "his", "Sub": "He", "Pos": "His"},
}


def _character(rng: random.Random) -> tuple[str, dict[str, str]]:
    gender = rng.choice(("she", "he"))
    return rng.choice(NAMES[gender]), PRONOUNS[gender]


def _story(rng: random.Random) -> str:
    name, p = _character(rng)
    friend, fp = _character(rng)
    while friend == name:
        friend, fp = _character(rng)
    animal, adj, place = rng.choice(ANIMALS), rng.choice(ADJECTIVES), rng.choice(PLACES)
    obj = f"{rng.choice(COLORS)} {rng.choice(OBJECTS)}"
    opening = rng.choice(
        [
            f"Once upon a time, there was a {adj} {animal} named {name}.",
            f"There once was a {adj} {animal} called {name} who lived near the {place}.",
            f"{name} was a {adj} {animal}.",
        ]
    )
    activity = rng.choice(ACTIVITIES)
    out = [
        opening,
        f"{p['Sub']} loved to {activity} in the {place}.",
        f"{p['Sub']} had a {obj} that {p['sub']} liked very much.",
    ]
    verb, what, consequence = rng.choice(PROBLEMS)
    what = what.format(pos=p["pos"], obj=obj, place=rng.choice(PLACES))
    weather = rng.choice(WEATHER)
    out.append(f"{rng.choice(TIMES)}, it was {weather}, and {name} {verb} {what}.")
    out.append(f"{p['Sub']} {consequence}, and {p['sub']} felt {rng.choice(['sad', 'worried', 'scared'])}.")
    out.append(f'"What is wrong?" asked {friend}, a {rng.choice(ADJECTIVES)} {rng.choice(ANIMALS)}.')
    out.append(f'"I {verb} my {obj}," said {name}.')
    out.append(rng.choice(HELPS).format(helper=friend, obj_pron=p["obj"], place=place))
    out.append(
        f"{name} was so {rng.choice(['happy', 'proud', 'glad'])} that {p['sub']} gave {friend} a {rng.choice(FOODS)}."
    )
    if rng.random() < 0.5:
        out.append(f"Then {name} and {friend} went to {activity} together until the sun went down.")
    out.append(f"{p['Sub']} learned something that day. {rng.choice(MORALS)}")
    return " ".join(out)


def _dialogue(rng: random.Random) -> str:
    a, _ = _character(rng)
    b, _ = _character(rng)
    food, place = rng.choice(FOODS), rng.choice(PLACES)
    n = rng.randint(2, 9)
    return " ".join(
        [
            f'"Do you want to go to the {place}?" asked {a}.',
            f'"Yes, but first I want to eat {NUMBERS[n]} {food}s," said {b}.',
            f'"{NUMBERS[n].capitalize()} {food}s is a lot!" said {a} with a laugh.',
            f'"Then I will eat {NUMBERS[n - 1]}," said {b}, and they both smiled.',
            f"After that, they walked to the {place} and it was {rng.choice(WEATHER)} all afternoon.",
        ]
    )


def _facts(rng: random.Random) -> str:
    lines = []
    for animal in rng.sample(ANIMALS, 3):
        color = rng.choice(COLORS)
        lines.append(
            f"A {animal} is an animal. This {animal} is {color}. "
            f"The {color} {animal} likes to eat a {rng.choice(FOODS)} in the {rng.choice(PLACES)}."
        )
    return " ".join(lines)


def _counting(rng: random.Random) -> str:
    a, b = rng.randint(0, 5), rng.randint(0, 5)
    obj = rng.choice(FOODS)
    name, p = _character(rng)
    return (
        f"{name} had {NUMBERS[a]} {obj}s. {p['Sub']} found {NUMBERS[b]} more. "
        f"Now {p['sub']} has {NUMBERS[a + b]} {obj}s. {NUMBERS[a].capitalize()} plus {NUMBERS[b]} is "
        f"{NUMBERS[a + b]}."
    )


def _instructions(rng: random.Random) -> str:
    food = rng.choice(FOODS)
    steps = rng.sample(
        [
            f"wash the {food}",
            "find a big bowl",
            "ask a grown-up for help",
            f"cut the {food} into small pieces",
            "put everything on a plate",
            "clean the table",
            "wash your hands",
        ],
        4,
    )
    ordinals = ["First", "Then", "Next", "Last"]
    body = " ".join(f"{o}, {s}." for o, s in zip(ordinals, steps))
    return f"How to make a {food} snack. {body} Now you can share it with a friend."


_GENRES = ((_story, 0.6), (_dialogue, 0.12), (_facts, 0.1), (_counting, 0.1), (_instructions, 0.08))


def generate_documents(num_documents: int = DEFAULT_NUM_DOCUMENTS, seed: int = DEFAULT_SEED) -> list[str]:
    """Return ``num_documents`` generated documents (one story/dialogue/fact sheet each).

    Deterministic: the same arguments give the same list on every machine and Python >= 3.10.
    """
    rng = random.Random(seed)
    funcs = [f for f, _ in _GENRES]
    weights = [w for _, w in _GENRES]
    return [rng.choices(funcs, weights)[0](rng) for _ in range(num_documents)]


@functools.lru_cache(maxsize=4)
def embedded_documents(
    num_documents: int = DEFAULT_NUM_DOCUMENTS, seed: int = DEFAULT_SEED
) -> tuple[str, ...]:
    """The embedded default corpus as a tuple of documents (cached; treat as read-only)."""
    return tuple(generate_documents(num_documents, seed))


def embedded_corpus_text() -> str:
    """The embedded default corpus as one string, one document per line."""
    return "\n".join(embedded_documents()) + "\n"


def embedded_corpus_hash() -> str:
    """A short content hash of the corpus (keys the tokenizer cache)."""
    return hashlib.sha256(f"v{CORPUS_VERSION}\n{embedded_corpus_text()}".encode()).hexdigest()[:16]
