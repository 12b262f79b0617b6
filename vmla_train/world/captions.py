"""Captions of scenes (many paraphrases) and the parser that inverts every one of them.

Grammar of a caption (``[]`` optional, ``|`` alternatives; every choice random, objects in random order):

    caption  := [prefix] clause (joined by "while" | "and" | "as" | ",") [background]
    clause   := article [size] colour shape motion
    motion   := [adverb] verb direction [adverb]        verb: drifts | moves | glides | slides | travels | floats
              | "is" verb-ing direction [adverb]         (drifting, moving, ...)
              | "bounces" d "and" opposite(d)             axis-aligned motion only: d = the initial direction
    direction:= left | to the left | leftward | ...       axis-aligned
              | up and to the right | up and right | toward the upper right | diagonally up and right | ...
    background := on | over | against  a [tone] (plain background | gradient background | textured background | ...)

Synonyms: small = little | tiny, large = big, circle = disc | ball, square = block | box, slowly = gently |
leisurely, quickly = fast | rapidly | swiftly. A caption may leave out the size or the speed (the parser
returns ``None`` for them). ``parse_prompt`` reads any word order within an object's clause: an object
starts at its colour (with a size word and an article just before it) and runs to the next object.
"""

from __future__ import annotations

import re

import numpy as np

from .scene import COLOURS, DIRECTIONS, ObjectSpec, PromptSpec, Scene

MAX_OBJECTS = 3
SHAPE_WORDS = {"circle": "circle", "disc": "circle", "ball": "circle", "square": "square", "block": "square",
               "box": "square", "triangle": "triangle"}
SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
SPEED_WORDS = {"slowly": "slowly", "gently": "slowly", "leisurely": "slowly", "quickly": "quickly", "fast": "quickly",
               "rapidly": "quickly", "swiftly": "quickly"}
DIRECTION_WORDS = {"up": "up", "upward": "up", "upwards": "up", "upper": "up", "down": "down", "downward": "down",
                   "downwards": "down", "lower": "down", "left": "left", "leftward": "left", "leftwards": "left",
                   "right": "right", "rightward": "right", "rightwards": "right"}
VERBS = ("drifts", "moves", "glides", "slides", "travels", "floats")
VERBS_ING = ("drifting", "moving", "gliding", "sliding", "travelling", "floating")
BOUNCE_WORDS = ("bounces", "bouncing")
BACKGROUND_NOUNS = ("background", "backdrop", "gradient", "texture")
BACKGROUND_WORDS = {"on", "over", "against", "a", "an", "the", "plain", "grey", "gray", "dark", "light", "muted",
                    "soft", "softly", "textured", "shifting", "vertical", "horizontal", *BACKGROUND_NOUNS,
                    "drifting", "moving"}
ARTICLES = ("a", "an", "the", "one")
FILLERS = {"and", "while", "as", "to", "toward", "towards", "is", "diagonally", "across", "frame", "clip", "video",
           "where", "in", "which", "here", "we", "see", "there", "meanwhile"}
VOCABULARY = (set(COLOURS) | set(SHAPE_WORDS) | set(SIZE_WORDS) | set(SPEED_WORDS) | set(DIRECTION_WORDS) | set(VERBS)
              | set(VERBS_ING) | set(BOUNCE_WORDS) | BACKGROUND_WORDS | set(ARTICLES) | FILLERS)
_OPPOSITE = {"up": "down", "down": "up", "left": "right", "right": "left"}
_AXIS = {"up": "y", "down": "y", "left": "x", "right": "x"}


class PromptError(ValueError):
    """A prompt the world cannot stage; the message is one line saying why and what is known."""


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------
def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _syn(rng: np.random.Generator, words: dict[str, str], value: str) -> str:
    return _pick(rng, [w for w, v in words.items() if v == value])


def _direction_phrase(rng: np.random.Generator, d: str) -> str:
    if d in _OPPOSITE:
        return _pick(rng, [d, f"to the {d}", f"{d}ward" if d in ("left", "right") else f"{d}wards"])
    v, h = d.split("-")
    return _pick(rng, [f"{v} and to the {h}", f"{v} and {h}", f"diagonally {v} and {h}",
                       f"toward the {'upper' if v == 'up' else 'lower'} {h}"])


def _motion(rng: np.random.Generator, direction: str, speed: str | None) -> str:
    adverb = _syn(rng, SPEED_WORDS, speed) if speed else ""
    if direction in _OPPOSITE and rng.random() < 0.35:
        path = f"{direction} and {_OPPOSITE[direction]}"
        verb = _pick(rng, ["bounces", "is bouncing"])
    else:
        path = _direction_phrase(rng, direction)
        if direction in _OPPOSITE and rng.random() < 0.15:
            path += " across the frame"
        i = int(rng.integers(len(VERBS)))
        verb = _pick(rng, [VERBS[i], f"is {VERBS_ING[i]}"])
    if not adverb:
        return f"{verb} {path}"
    if adverb == "fast" or verb.startswith("is ") or rng.random() < 0.5:
        return f"{verb} {path} {adverb}"
    return f"{adverb} {verb} {path}"


def _tone(rgb) -> str:
    level = sum(rgb) / 3
    return "dark" if level < 80 else "light" if level > 140 else "grey"


def _background_phrase(rng: np.random.Generator, scene: Scene) -> str:
    bg = scene.background
    prep = _pick(rng, ["on", "over", "against"])
    tone = _tone(bg.colour)
    if bg.kind == "plain":
        return f"{prep} a {_pick(rng, ['plain ', f'{tone} ', f'plain {tone} ', ''])}{_pick(rng, ['background', 'backdrop'])}"
    if bg.kind == "gradient":
        return f"{prep} a {_pick(rng, ['', 'soft ', f'{bg.axis} '])}gradient{_pick(rng, ['', ' background'])}"
    return f"{prep} a {_pick(rng, ['', 'softly moving ', 'shifting ', 'drifting '])}{_pick(rng, ['texture', 'textured background'])}"


def caption(scene: Scene, rng: np.random.Generator | int = 0) -> str:
    """A random paraphrase describing ``scene`` (every object's colour, shape and initial direction;
    usually its size and speed; sometimes the background)."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    clauses = []
    for i in rng.permutation(len(scene.objects)):
        o = scene.objects[int(i)]
        size = f"{_syn(rng, SIZE_WORDS, o.size)} " if rng.random() < 0.85 else ""
        speed = o.speed if rng.random() < 0.75 else None
        clauses.append(f"a {size}{o.colour} {_syn(rng, SHAPE_WORDS, o.shape)} {_motion(rng, o.direction, speed)}")
    if len(clauses) == 1:
        text = clauses[0]
    elif len(clauses) == 2:
        text = f"{clauses[0]}{_pick(rng, [' while ', ' and ', ' as ', ', while ', ', and '])}{clauses[1]}"
    else:
        text = _pick(rng, [f"{clauses[0]}, {clauses[1]}, and {clauses[2]}",
                           f"{clauses[0]}{_pick(rng, [' while ', ' as '])}{clauses[1]} and {clauses[2]}",
                           f"{clauses[0]}, {clauses[1]}{_pick(rng, [' while ', ' as '])}{clauses[2]}"])
    text = _pick(rng, ["", "", "a clip where ", "a video in which ", "here "]) + text
    if rng.random() < 0.4:
        bg = _background_phrase(rng, scene)
        text = f"{bg}, {text}" if rng.random() < 0.3 else f"{text} {bg}"
    text = text[0].upper() + text[1:] if rng.random() < 0.5 else text
    return text + ("." if rng.random() < 0.5 else "")


# ----------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------
def vocabulary_line() -> str:
    return (f"colours {', '.join(COLOURS)}; shapes {', '.join(sorted(SHAPE_WORDS))}; sizes {', '.join(SIZE_WORDS)}; "
            f"directions {', '.join(DIRECTION_WORDS)}; speeds {', '.join(SPEED_WORDS)}; verbs {', '.join(VERBS)}, "
            f"bounces; backgrounds {', '.join(sorted(BACKGROUND_WORDS - set(ARTICLES)))}")


def _tokens(text: str) -> list[str]:
    """Words, clause punctuation, and every other run of characters as a token of its own (a number, a
    quote: not in the vocabulary, so refused rather than dropped)."""
    return re.findall(r"[a-z]+|[,;.]|[^\sa-z,;.]+", text.lower().replace("-", " "))


def _background_tokens(tokens: list[str]) -> tuple[set[int], str | None]:
    """The indices of the tokens in background clauses (preposition ... noun runs of background words, stopped
    by punctuation) and the kind the last one names."""
    kind, inside, i = None, set(), 0
    while i < len(tokens):
        if tokens[i] in ("on", "over", "against"):
            j = i + 1
            while j < len(tokens) and tokens[j] in BACKGROUND_WORDS:
                j += 1
            span = tokens[i:j]
            if any(t in BACKGROUND_NOUNS for t in span):
                while span[-1] not in BACKGROUND_NOUNS:  # leave trailing articles to what follows
                    span.pop()
                kind = "gradient" if "gradient" in span else "texture" if {"texture", "textured"} & set(span) else "plain"
                inside.update(range(i, i + len(span)))
                i += len(span)
                continue
        i += 1
    return inside, kind


def _take_background(tokens: list[str]) -> tuple[list[str], str | None]:
    """``tokens`` less their background clauses, and the background kind."""
    inside, kind = _background_tokens(tokens)
    return [t for i, t in enumerate(tokens) if i not in inside], kind


def _object_starts(words: list[str]) -> list[int]:
    """Where each object's clause starts in ``words`` (alphabetic, background removed): at its colour, or
    at the size word and the article just before it."""
    starts = []
    for i, t in enumerate(words):
        if t in COLOURS:
            s = i - 1 if i > 0 and words[i - 1] in SIZE_WORDS else i
            starts.append(s - 1 if s > 0 and words[s - 1] in ARTICLES else s)
    return starts


def clause_roles(tokens: list[str]) -> list[int]:
    """For each token of a caption (lower-cased words and punctuation marks, the word-level pieces of the
    world tokenizer), the index of the object clause it belongs to in ``parse_prompt``'s order, or -1:
    punctuation, background clauses and words before the first object."""
    inside, _ = _background_tokens(tokens)
    kept = [i for i, t in enumerate(tokens) if t.isalpha() and i not in inside]  # token index of each word
    starts = _object_starts([tokens[i] for i in kept])
    roles = [-1] * len(tokens)
    for k, s in enumerate(starts):
        for w in kept[s: starts[k + 1] if k + 1 < len(starts) else len(kept)]:
            roles[w] = k
    return roles


def _direction(words: list[str], bounce: bool, name: str) -> str:
    dirs = [DIRECTION_WORDS[w] for w in words if w in DIRECTION_WORDS]
    if not dirs:
        raise PromptError(f"the {name} names no direction (e.g. 'drifts left', 'moves up and to the right', "
                          "'bounces up and down')")
    if len(dirs) == 2 and dirs[1] == _OPPOSITE[dirs[0]]:
        if bounce:
            return dirs[0]
        raise PromptError(f"the {name} names opposite directions '{dirs[0]}' and '{dirs[1]}' "
                          f"(say 'bounces {dirs[0]} and {dirs[1]}' for a bounce starting {dirs[0]})")
    by_axis: dict[str, str] = {}
    for d in dirs:
        if by_axis.setdefault(_AXIS[d], d) != d or len(dirs) > 2:
            raise PromptError(f"the {name} names conflicting directions {dirs}; use one of "
                              f"{', '.join(DIRECTIONS)} (or 'bounces up and down' / 'bounces left and right')")
    return f"{by_axis['y']}-{by_axis['x']}" if len(by_axis) == 2 else dirs[0]


def _one(words: list[str], kind: dict[str, str], what: str, name: str) -> str | None:
    found = sorted({kind[w] for w in words if w in kind})
    if len(found) > 1:
        raise PromptError(f"the {name} names two {what}s {found}; give one")
    return found[0] if found else None


def parse_prompt(text: str) -> PromptSpec:
    """The objects (colour, shape, direction; size and speed when named) and background kind of a prompt.
    Raises ``PromptError`` (one line) for an empty prompt, unknown words, no object, a repeated colour,
    an object without a shape or a direction, or more than ``MAX_OBJECTS`` objects."""
    tokens = _tokens(text or "")
    words = [t for t in tokens if t not in ",;."]
    if not words:
        raise PromptError("the prompt is empty: describe 1-3 objects, e.g. 'a small red circle drifts left'")
    unknown = sorted({w for w in words if w not in VOCABULARY})
    if unknown:
        raise PromptError(f"unknown word(s) {', '.join(repr(w) for w in unknown)} in {text.strip()!r}; "
                          f"known words: {vocabulary_line()}")
    tokens, background = _take_background(tokens)
    tokens = [t for t in tokens if t.isalpha()]
    at = [i for i, t in enumerate(tokens) if t in COLOURS]
    if not at:
        raise PromptError(f"the prompt {text.strip()!r} names no object: give each a colour "
                          f"({', '.join(COLOURS)}) and a shape, e.g. 'a red circle drifts left'")
    colours = [tokens[i] for i in at]
    repeated = sorted({c for c in colours if colours.count(c) > 1})
    if repeated:
        raise PromptError(f"the prompt repeats the colour(s) {repeated}: each object needs its own colour")
    if len(at) > MAX_OBJECTS:
        raise PromptError(f"the prompt names {len(at)} objects ({', '.join(colours)}); at most {MAX_OBJECTS}")
    starts = _object_starts(tokens)
    stray = [w for w in tokens[:starts[0]] if w in SHAPE_WORDS or w in SIZE_WORDS or w in SPEED_WORDS
             or w in DIRECTION_WORDS]
    if stray:
        raise PromptError(f"'{stray[0]}' comes before any colour: name each object as '[size] colour shape "
                          "motion', e.g. 'a small red circle drifts left'")
    objects = []
    for k, (s, c) in enumerate(zip(starts, colours)):
        group = tokens[s: starts[k + 1] if k + 1 < len(starts) else len(tokens)]
        shape = _one(group, SHAPE_WORDS, "shape", f"{c} object")
        if shape is None:
            raise PromptError(f"the {c} object names no shape ({', '.join(sorted(set(SHAPE_WORDS.values())))})")
        name = f"{c} {shape}"
        bounce = any(w in BOUNCE_WORDS for w in group)
        objects.append(ObjectSpec(c, shape, _direction(group, bounce, name), _one(group, SIZE_WORDS, "size", name),
                                  _one(group, SPEED_WORDS, "speed", name)))
    return PromptSpec(tuple(objects), background)
