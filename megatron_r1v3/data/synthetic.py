"""Embedded toy task: small drawn images with questions a tiny VLM can learn, deterministic from a seed.

Six templates over a few shapes, colours and digits (drawn with Pillow, no downloads):
- colour_mc    "What colour is the circle?" with options A-D, answer is the letter;
- colour_word  the same, answered with the colour word;
- shape_word   "What shape is shown?" answer is a word;
- count_number "How many squares are in the image?" (1-6), answer is the number;
- count_mc     the same with options A-D;
- digit_number a digit in Pillow's default font, answer is the digit.
`pretrain_{train,val}.jsonl` caption the same images with the sentence every trace opens with (`pretrain_sample`).
Every sample has an SFT trace `<think>\\n...\\n</think>\\n\\nThe answer is \\boxed{X}.`; `wrong_fraction` of the
training traces deliberately reason their way to a wrong answer (the `answer` field stays right), so that RL
starts from an imperfect SFT model; `reflect_fraction` of them make a reasoning move after the first read of the
image, as the report's traces do ("Wait, let me look at the image again." correcting a different first read, or
"Hmm, let me look again to be sure." confirming it), so critical-token entropy has its critical tokens. Each
record's `meta` holds the facts the answer follows from and its `difficulty` (the easy->hard curriculum).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from megatron_r1v3.data.records import Sample, write_jsonl, write_parquet

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (235, 195, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DEFAULT_TASKS: tuple[str, ...] = ("colour_mc", "shape_word", "count_number", "count_mc", "digit_number")
TASKS: tuple[str, ...] = (*DEFAULT_TASKS, "colour_word")
# for the easy->hard curriculum (rl.curriculum): colour is one pixel statistic, a shape or a digit needs its
# outline, counting needs every object; options (MC) make a task no harder to see
DIFFICULTY: dict[str, int] = {"colour_mc": 1, "colour_word": 1, "shape_word": 2, "digit_number": 2,
                              "count_mc": 3, "count_number": 3}
BACKGROUND = (255, 255, 255)
LETTERS = "ABCD"
MAX_COUNT = 6
_SPLIT_CODES = {"train": 0, "val": 1}
_SHAPE_FACTS = {
    "circle": "It is round and has no corners",
    "square": "It has four equal straight sides and four right angles",
    "triangle": "It has three straight sides and three corners",
}


@dataclass(frozen=True)
class ToyDataset:
    """Where `generate_toy_dataset` wrote things; JSONL image paths are relative to `root`."""

    root: Path
    train_jsonl: Path
    val_jsonl: Path
    train_parquet: Path | None = None
    val_parquet: Path | None = None


def format_trace(reasoning: str, answer: str) -> str:
    """The SFT response format: think block, blank line, final boxed answer."""
    return f"<think>\n{reasoning}\n</think>\n\nThe answer is \\boxed{{{answer}}}."


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _one_shape(size: int, shape: str, colour: str, rng: np.random.Generator) -> Image.Image:
    """One large shape, slightly jittered, on a white background."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    side = int(size * rng.uniform(0.5, 0.7))
    x0, y0 = (int(v) for v in rng.integers(1, size - side, size=2))
    _draw_shape(ImageDraw.Draw(img), shape, (x0, y0, x0 + side - 1, y0 + side - 1), COLOURS[colour])
    return img


def _many_shapes(size: int, shape: str, colour: str, count: int, rng: np.random.Generator) -> Image.Image:
    """`count` separate copies of one shape in distinct cells of a 3x2 grid (never touching)."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell_w, cell_h = size // 3, size // 2
    side = max(3, int(min(cell_w, cell_h) * 0.7))
    for cell in rng.choice(6, size=count, replace=False):
        col, row = int(cell) % 3, int(cell) // 3
        x0 = col * cell_w + 1 + int(rng.integers(0, cell_w - side - 1))
        y0 = row * cell_h + 1 + int(rng.integers(0, cell_h - side - 1))
        _draw_shape(draw, shape, (x0, y0, x0 + side - 1, y0 + side - 1), COLOURS[colour])
    return img


def _digit(size: int, digit: int, rng: np.random.Generator) -> Image.Image:
    """A dark digit in Pillow's default font, centred with a little jitter."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(8, int(size * 0.7)))
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font)
    jitter = rng.integers(-size // 10, size // 10 + 1, size=2)
    x = (size - (right - left)) // 2 - left + int(jitter[0])
    y = (size - (bottom - top)) // 2 - top + int(jitter[1])
    draw.text((x, y), str(digit), fill=(20, 20, 20), font=font)
    return img


def _options(truth: str, pool: list[str], rng: np.random.Generator) -> list[str]:
    """Four distinct options from `pool` including `truth`, in random order."""
    others = [p for p in pool if p != truth]
    picked = [truth] + [others[int(i)] for i in rng.choice(len(others), size=3, replace=False)]
    return [picked[int(i)] for i in rng.permutation(4)]


def _mc_question(stem: str, options: list[str]) -> str:
    lines = [stem] + [f"{letter}. {opt}" for letter, opt in zip(LETTERS, options)]
    return "\n".join(lines + ["Answer with the option's letter."])


def _wrong(truth: str, pool: list[str], rng: np.random.Generator) -> str:
    others = [p for p in pool if p != truth]
    return others[int(rng.integers(len(others)))]


def _count_words(shape: str, n: int) -> str:
    return f"{n} {shape}" + ("" if n == 1 else "s")


def _draw(task: str, size: int, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """Draw the image of one `task` sample; returns it with the facts the answer follows from."""
    if task in ("colour_mc", "shape_word", "count_number", "count_mc", "colour_word"):
        shape, colour = SHAPES[int(rng.integers(len(SHAPES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))]
        if task in ("colour_mc", "shape_word", "colour_word"):
            return _one_shape(size, shape, colour, rng), {"shape": shape, "colour": colour}
        count = int(rng.integers(1, MAX_COUNT + 1))
        return _many_shapes(size, shape, colour, count, rng), {"shape": shape, "colour": colour, "count": count}
    if task == "digit_number":
        digit = int(rng.integers(10))
        return _digit(size, digit, rng), {"digit": digit}
    raise ValueError(f"unknown toy task {task!r}; known: {TASKS}")


def describe(facts: dict[str, Any]) -> str:
    """The opening sentence of every trace and the whole pretraining answer: what the image shows."""
    if "digit" in facts:
        return f"The image shows the digit {facts['digit']}."
    if "count" in facts:
        return f"The image shows {_count_words(facts['colour'] + ' ' + facts['shape'], int(facts['count']))}."
    return f"The image shows a {facts['colour']} {facts['shape']}."


def _ask(task: str, facts: dict[str, Any], rng: np.random.Generator, correct: bool,
         reflect: str | None = None) -> dict[str, Any]:
    """Question, right answer, reasoning steps and the trace's final answer (wrong when `correct` is False); with
    `reflect` (a REFLECT_MOVES name) the trace makes that reasoning move after its first read (`_reflect`)."""
    options = None
    if task == "colour_mc":
        truth, shape = facts["colour"], facts["shape"]
        options = _options(truth, list(COLOURS), rng)
        said = truth if correct else _wrong(truth, options, rng)
        question = _mc_question(f"What colour is the {shape}?", options)
        steps = [describe({**facts, "colour": said}), f"Its colour is {said}."]
        steps.append(f"Option {LETTERS[options.index(said)]} is {said}.")
        answer, final = LETTERS[options.index(truth)], LETTERS[options.index(said)]
    elif task == "colour_word":
        truth, shape = facts["colour"], facts["shape"]
        said = truth if correct else _wrong(truth, list(COLOURS), rng)
        question = f"What colour is the {shape}? Answer with one word."
        steps = [describe({**facts, "colour": said}), f"Its colour is {said}."]
        answer, final = truth, said
    elif task == "shape_word":
        truth = facts["shape"]
        said = truth if correct else _wrong(truth, list(SHAPES), rng)
        question = "What shape is shown in the image? Answer with one word."
        steps = [describe({**facts, "shape": said}), f"{_SHAPE_FACTS[said]}, so it is a {said}."]
        answer, final = truth, said
    elif task in ("count_number", "count_mc"):
        truth, shape = str(facts["count"]), facts["shape"]
        pool = [str(n) for n in range(1, MAX_COUNT + 1)]
        if task == "count_mc":
            options = _options(truth, pool, rng)
        said = truth if correct else _wrong(truth, options or pool, rng)
        stem = f"How many {shape}s are in the image?"
        steps = [describe({**facts, "count": int(said)}),
                 f"I count the {shape}s one by one: {', '.join(str(k) for k in range(1, int(said) + 1))}."]
        steps.append(f"There {'is' if said == '1' else 'are'} {_count_words(shape, int(said))}.")
        if options:
            question = _mc_question(stem, options)
            steps.append(f"Option {LETTERS[options.index(said)]} is {said}.")
            answer, final = LETTERS[options.index(truth)], LETTERS[options.index(said)]
        else:
            question, answer, final = stem + " Answer with a number.", truth, said
    else:
        truth = str(facts["digit"])
        said = truth if correct else _wrong(truth, [str(d) for d in range(10)], rng)
        question = "What digit is written in the image? Answer with the digit."
        steps = [describe({"digit": said}), f"It is the digit {said}."]
        answer, final = truth, said
    if reflect:
        steps = _reflect(task, facts, steps, said, reflect, rng)
    return {"question": question, "answer": answer, "steps": steps, "final": final, "options": options}


REFLECT_MOVES = ("fix", "confirm")
_ASKED = {"colour_mc": ("colour", list(COLOURS)), "colour_word": ("colour", list(COLOURS)),
          "shape_word": ("shape", list(SHAPES)), "count_number": ("count", list(range(1, MAX_COUNT + 1))),
          "count_mc": ("count", list(range(1, MAX_COUNT + 1))), "digit_number": ("digit", list(range(10)))}


def _reflect(task: str, facts: dict[str, Any], steps: list[str], said: str, move: str,
             rng: np.random.Generator) -> list[str]:
    """Insert a reasoning move after the first read of the image (`steps[0]`, which states the trace's `said`):
    `fix` opens with a different (wrong) read, then "Wait, let me look at the image again." and the `said` read;
    `confirm` keeps the read, then "Hmm, let me look again to be sure." and "Yes, ..." restating it."""
    key, pool = _ASKED[task]
    said_value = type(pool[0])(said)
    if move == "fix":
        first_read = describe({**facts, key: _wrong(said_value, pool, rng)})
        return [first_read, "Wait, let me look at the image again.", *steps]
    if move == "confirm":
        read = steps[0]
        return [read, "Hmm, let me look again to be sure.", f"Yes, {read[0].lower()}{read[1:]}", *steps[1:]]
    raise ValueError(f"reflection move must be one of {REFLECT_MOVES}, got {move!r}")


def difficulty(task: str, image: Image.Image) -> float:
    """The task's level (`DIFFICULTY`) plus the share of the image the drawing leaves blank: within a task, less
    ink (a small triangle) is a harder read than a large square. In [level, level + 1]."""
    ink = float((np.asarray(image) != np.asarray(BACKGROUND, dtype=np.uint8)).any(axis=-1).mean())
    return round(DIFFICULTY[task] + 1.0 - ink, 4)


def make_item(task: str, size: int, rng: np.random.Generator, correct: bool,
              reflect: str | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """Draw one sample of `task`; returns the image and a dict of question, answer, response and meta."""
    image, facts = _draw(task, size, rng)
    qa = _ask(task, facts, rng, correct, reflect)
    meta: dict[str, Any] = {"task": task, "difficulty": difficulty(task, image), "trace_correct": correct, **facts}
    if reflect:
        meta["reflection"] = reflect
    if qa["options"]:
        meta["options"] = qa["options"]
    meta["trace_answer"] = qa["final"]
    response = format_trace(" ".join(qa["steps"]), qa["final"])
    return image, {"question": qa["question"], "answer": qa["answer"], "response": response, "meta": meta}


PRETRAIN_QUESTION = "Describe the image in one sentence."


def pretrain_sample(sample: Sample) -> Sample:
    """The captioning twin of a toy sample: same image, the response is the true `describe` sentence (which every
    SFT trace also opens with, stating its possibly wrong facts).

    A stand-in for the pretraining a real VLM has before cold-start SFT: in a ~50-token reasoning trace the few
    tokens that depend on the image carry too little of the loss for a tiny model to learn to see within a CPU
    demo (measured: held-out accuracy stays at chance); a short caption puts most of the loss there.
    """
    m = sample.meta or {}
    facts = {k: m[k] for k in ("colour", "shape", "count", "digit") if k in m}
    if m.get("task") in ("colour_mc", "shape_word", "colour_word"):
        facts.pop("count", None)
    text = describe(facts)
    return Sample(images=list(sample.images), image_paths=list(sample.image_paths), id=f"{sample.id}-describe",
                  question=PRETRAIN_QUESTION, answer=text, response=text, meta={"task": "describe", **facts})


def encode_image(image: Image.Image, image_format: str) -> bytes:
    """PNG (lossless, default) or JPEG (quality 95) bytes; both deterministic for a given Pillow build."""
    buf = io.BytesIO()
    if image_format == "png":
        image.save(buf, "PNG")
    elif image_format in ("jpeg", "jpg"):
        image.save(buf, "JPEG", quality=95)
    else:
        raise ValueError(f"image_format must be png or jpeg, got {image_format!r}")
    return buf.getvalue()


def wrong_indices(n: int, wrong_fraction: float, seed: int, split: str) -> set[int]:
    """Exactly round(n * wrong_fraction) sample indices whose trace ends wrong, chosen from the seed."""
    if not 0.0 <= wrong_fraction <= 1.0:
        raise ValueError(f"wrong_fraction must be in [0, 1], got {wrong_fraction}")
    k = int(round(n * wrong_fraction))
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], 7919])
    return {int(i) for i in rng.choice(n, size=k, replace=False)} if k else set()


def reflection_moves(n: int, reflect_fraction: float, seed: int, split: str) -> dict[int, str]:
    """Exactly round(n * reflect_fraction) sample indices whose trace makes a reasoning move, and which move
    (`fix` and `confirm` alternate over the chosen indices in order), chosen from the seed."""
    if not 0.0 <= reflect_fraction <= 1.0:
        raise ValueError(f"reflect_fraction must be in [0, 1], got {reflect_fraction}")
    k = int(round(n * reflect_fraction))
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], 104729])
    chosen = sorted(int(i) for i in rng.choice(n, size=k, replace=False)) if k else []
    return {i: REFLECT_MOVES[j % len(REFLECT_MOVES)] for j, i in enumerate(chosen)}


def generate_split(
    out_dir: Path,
    split: str,
    n: int,
    seed: int,
    image_size: int = 56,
    wrong_fraction: float = 0.0,
    image_format: str = "png",
    tasks: tuple[str, ...] = DEFAULT_TASKS,
    reflect_fraction: float = 0.0,
) -> list[Sample]:
    """Draw and save n samples of one split (images under out_dir/images/<split>/); returns the samples.

    Sample i depends only on (seed, split, i), so growing n keeps the earlier samples unchanged.
    """
    if image_size < 24:
        raise ValueError(f"image_size must be >= 24 px for shapes to stay recognisable, got {image_size}")
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    wrong = wrong_indices(n, wrong_fraction, seed, split)
    moves = reflection_moves(n, reflect_fraction, seed, split)
    suffix = "png" if image_format == "png" else "jpg"
    samples = []
    for index in range(n):
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
        image, fields = make_item(tasks[index % len(tasks)], image_size, rng, correct=index not in wrong,
                                  reflect=moves.get(index))
        rel = f"images/{split}/{index:06d}.{suffix}"
        (out_dir / rel).write_bytes(encode_image(image, image_format))
        samples.append(Sample(images=[rel], image_paths=[out_dir / rel], id=f"toy-{split}-{index:06d}", **fields))
    return samples


def generate_toy_dataset(
    out_dir: str | Path,
    n_train: int = 512,
    n_val: int = 64,
    seed: int = 0,
    image_size: int = 56,
    wrong_fraction: float = 0.0,
    image_format: str = "png",
    parquet: bool = False,
    tasks: tuple[str, ...] = DEFAULT_TASKS,
    reflect_fraction: float = 0.0,
) -> ToyDataset:
    """Write train/val JSONL (+ images, + optional Parquet with embedded images) of the toy task.

    `wrong_fraction` applies to the training traces only; validation traces are always correct.
    `reflect_fraction` of the traces of both splits make a reasoning move (`reflection_moves`).
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path | None] = {}
    for split, n, frac in (("train", n_train, wrong_fraction), ("val", n_val, 0.0)):
        samples = generate_split(root, split, n, seed, image_size, frac, image_format, tuple(tasks),
                                 reflect_fraction)
        paths[f"{split}_jsonl"] = root / f"{split}.jsonl"
        write_jsonl(paths[f"{split}_jsonl"], samples)
        write_jsonl(root / f"pretrain_{split}.jsonl", [pretrain_sample(s) for s in samples])
        if parquet:
            paths[f"{split}_parquet"] = root / f"{split}.parquet"
            write_parquet(paths[f"{split}_parquet"], samples)
    return ToyDataset(root=root, **paths)
