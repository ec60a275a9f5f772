"""The text-only pretraining corpus of the demo's two text encoders, and the "understanding" test prompts.

A real LLM's pretraining text is far wider than any caption set; this corpus plays that part at toy scale. It
names every colour, shape, motion and count in many words the video captions never use (synonyms, paraphrases,
everyday things of that colour) and states how they relate ("crimson is a shade of red", "a lemon is yellow").
Both encoders learn from exactly these documents, each with its own objective (build.py): T5 by span-corruption
denoising, the causal LM by next-token prediction plus answers to the four fuser instructions and a plain-words
restatement of the prompt. The DiT never sees this text: it trains on the narrow captions of world.py.

`understanding_prompts()` are prompts whose every attribute word is corpus-only: they test whether a model reads
what the prompt means, not which caption words it contains.
"""

from __future__ import annotations

import itertools

import numpy as np

from ..fuser import DEFAULT_INSTRUCTIONS
from .world import ALL_TRIPLES, COLOURS, HELDOUT_TRIPLES, PHRASES, PLURALS, TRAIN_TRIPLES, make_caption

COLOUR_SYNONYMS = {
    "red": ("crimson", "scarlet", "ruby"),
    "green": ("emerald", "jade", "lime"),
    "blue": ("azure", "navy", "cobalt"),
    "yellow": ("golden", "canary", "amber"),
    "purple": ("violet", "lavender", "lilac"),
    "white": ("snowy", "ivory", "pearly"),
}
# Everyday things of one colour: "a lemon coloured ball" names yellow only through what a lemon is.
COLOUR_THINGS = {
    "red": ("tomato", "cherry", "strawberry"),
    "green": ("grass", "leaf", "frog"),
    "blue": ("sky", "ocean", "sapphire"),
    "yellow": ("lemon", "banana", "sunflower"),
    "purple": ("plum", "grape", "eggplant"),
    "white": ("snow", "cloud", "milk"),
}
SHAPE_SYNONYMS = {  # (singular, plural)
    "circle": (("ball", "balls"), ("disc", "discs"), ("dot", "dots")),
    "square": (("box", "boxes"), ("block", "blocks"), ("tile", "tiles")),
    "triangle": (("wedge", "wedges"), ("pyramid", "pyramids"), ("spike", "spikes")),
}
MOTION_SYNONYMS = {  # (singular verb, plural verb)
    "up": (("rises", "rise"), ("climbs", "climb"), ("ascends", "ascend")),
    "down": (("sinks", "sink"), ("drops", "drop"), ("descends", "descend")),
    "left": (("heads west", "head west"), ("travels west", "travel west"), ("slides west", "slide west")),
    "right": (("heads east", "head east"), ("travels east", "travel east"), ("slides east", "slide east")),
    "still": (("rests", "rest"), ("remains", "remain"), ("waits", "wait")),
}
COUNT_SYNONYMS = {1: ("a lone", "a solitary", "just one"), 2: ("a pair of", "a couple of", "twin"),
                  3: ("a trio of", "a triplet of", "a threesome of")}
COUNT_NAMES = {1: "one", 2: "two", 3: "three"}
MOTION_MEANINGS = {"up": "move up", "down": "move down", "left": "move to the left", "right": "move to the right",
                   "still": "stay still"}
# Where the objects end up, for the spatial instruction.
ENDS = {"up": "top of the frame", "down": "bottom of the frame", "left": "left of the frame",
        "right": "right of the frame", "still": "where they started"}


def corpus_vocabulary() -> list[str]:
    """Every word the corpus and the understanding prompts can use, sorted."""
    texts = [*itertools.chain(*COLOUR_SYNONYMS.values(), *COUNT_SYNONYMS.values()), *facts(),
             *(form for forms in SHAPE_SYNONYMS.values() for pair in forms for form in pair),
             *(form for forms in MOTION_SYNONYMS.values() for pair in forms for form in pair),
             *(answer for (colour, shape, motion), count in itertools.product(ALL_TRIPLES, (1, 2, 3))
               for answer in instruction_answers(colour, shape, motion, count)),
             *DEFAULT_INSTRUCTIONS, "an coloured . in plain words"]
    return sorted({word for text in texts for word in text.lower().replace(".", " . ").split()})


def describe(colour: str, shape: str, motion: str, count: int, choice: tuple[int, int, int, int],
             plain: tuple[bool, bool, bool, bool] = (False,) * 4) -> str:
    """A prompt in corpus words. choice picks the synonym of (count, colour, shape, motion); a colour choice of 3-5
    names one of the colour's everyday things ("lemon coloured"); plain[k] keeps that attribute's caption word."""
    det_choice, colour_choice, shape_choice, motion_choice = choice
    determiner = {1: "a", 2: "two", 3: "three"}[count] if plain[0] else COUNT_SYNONYMS[count][det_choice % 3]
    if plain[1]:
        colour_word = colour
    elif colour_choice % 6 < 3:
        colour_word = COLOUR_SYNONYMS[colour][colour_choice % 3]
    else:
        colour_word = f"{COLOUR_THINGS[colour][colour_choice % 3]} coloured"
    noun = (shape if count == 1 else PLURALS[shape]) if plain[2] else SHAPE_SYNONYMS[shape][shape_choice % 3][count > 1]
    verb = PHRASES[motion][0][count > 1] if plain[3] else MOTION_SYNONYMS[motion][motion_choice % 3][count > 1]
    if determiner == "a" and colour_word[0] in "aeiou":
        determiner = "an"
    return f"{determiner} {colour_word} {noun} {verb}"


def instruction_answers(colour: str, shape: str, motion: str, count: int) -> tuple[str, ...]:
    """Answers to DEFAULT_INSTRUCTIONS (motion, colour, spatial positions, number), then the restatement.

    Each answer starts with the word that tells it apart (up, red, top, two): an instruction token is the LLM's
    state that predicts that first word. An answer opening with a shared word ("move up", "move down") left the
    motion token nearly the same for every direction (8% apart, against 135% for colours), and the DiT reading it
    lost direction (17% on held-out prompts, against 91% for the same DiT reading T5 alone)."""
    return (motion, colour, ENDS[motion], COUNT_NAMES[count], make_caption(shape, colour, motion, count))


def facts() -> list[str]:
    """How each corpus word relates to the plain word it means."""
    lines = []
    for colour in COLOURS:
        lines += [f"{word} is a shade of {colour}" for word in COLOUR_SYNONYMS[colour]]
        lines += [f"a {thing} is {colour}" for thing in COLOUR_THINGS[colour]]
        lines += [f"{thing} coloured means {colour}" for thing in COLOUR_THINGS[colour]]
    for shape, forms in SHAPE_SYNONYMS.items():
        lines += [f"a {singular} looks like a {shape}" for singular, _ in forms]
        lines += [f"{plural} are {PLURALS[shape]}" for _, plural in forms]
    for motion, forms in MOTION_SYNONYMS.items():
        lines += [f"to {plural} means to {MOTION_MEANINGS[motion]}" for _, plural in forms]
    for count, words in COUNT_SYNONYMS.items():
        lines += [f"{word} means {COUNT_NAMES[count]}" for word in words]
    return lines


def understanding_prompts(counts=(1, 2, 3)) -> list[dict]:
    """Prompts in corpus words only, for the held-out triples and as many seen ones, one per count, with the
    attributes a clip should show (the keys of `analysis.analyse`) and "split": "heldout" or "seen".
    The synonyms rotate with the prompt's index, mixing synonyms and everyday-thing colours (not every corpus
    word appears); the corpus never holds these exact prompts (`documents` leaves them out)."""
    rng = np.random.default_rng(11)
    seen = [TRAIN_TRIPLES[i] for i in sorted(rng.choice(len(TRAIN_TRIPLES), len(HELDOUT_TRIPLES), replace=False))]
    prompts = []
    for split, triples in (("heldout", HELDOUT_TRIPLES), ("seen", seen)):
        for index, ((colour, shape, motion), count) in enumerate(itertools.product(triples, counts)):
            choice = (index, index + len(prompts), index // 3 + count, index + count)
            prompts.append({"prompt": describe(colour, shape, motion, count, choice), "colour": colour,
                            "direction": motion, "count": count, "shape": shape, "split": split})
    return prompts


def documents(n: int, seed: int) -> list[dict]:
    """n corpus documents plus the facts, each {"text"} (a description or a fact) or {"prompt", "instruction",
    "answer"} (an instruction answer; instruction "" asks for the restatement). Descriptions mix corpus and
    caption words over all triples; the exact understanding prompts are left out."""
    rng = np.random.default_rng([seed, 11])
    held_out = {item["prompt"] for item in understanding_prompts()}
    docs = [{"text": line} for line in facts()]
    instructions = (*DEFAULT_INSTRUCTIONS, "")
    while len(docs) < n:
        colour, shape, motion = ALL_TRIPLES[rng.integers(len(ALL_TRIPLES))]
        count = int(rng.integers(1, 4))
        plain = tuple(bool(p) for p in rng.random(4) < 0.3)
        prompt = describe(colour, shape, motion, count, tuple(int(c) for c in rng.integers(0, 6, 4)), plain)
        if prompt in held_out:
            continue
        if rng.random() < 0.25:
            docs.append({"text": prompt})
        else:
            k = int(rng.integers(len(instructions)))
            docs.append({"prompt": prompt, "instruction": instructions[k],
                         "answer": instruction_answers(colour, shape, motion, count)[k]})
    return docs


def plain_text(doc: dict) -> str:
    """A document as one line of text: what T5 denoises (the causal LM reads instruction answers chat-wrapped)."""
    if "text" in doc:
        return doc["text"]
    middle = doc["instruction"].lower().replace(".", " .") if doc["instruction"] else "in plain words"
    return f"{doc['prompt']} . {middle} {doc['answer']}"
