"""Rendered word images for PP-OCR text recognition, and its greedy CTC reading.

Two sets that share nothing but the alphabet, so that a budget tuned on one
is judged on the other:

* **calibration**: :data:`CALIBRATION_WORDS`, DejaVu Sans and Sans Bold,
  dark text on light paper, mild Gaussian noise;
* **held out**: :data:`HELD_OUT_WORDS` plus seeded random codes (letters and
  digits), DejaVu Serif, Sans Mono, Sans Condensed and Sans Oblique, text
  and paper shades drawn per image, and either light noise (*clean*) or one
  of three degradations (*degraded*: stronger Gaussian noise, a box blur,
  salt-and-pepper specks).

Images are prepared as rapidocr prepares them for the recognizer: resized to
height 48 keeping the aspect ratio, scaled to ``[-1, 1]`` and zero-padded on
the right to width 320 (``N x 3 x 48 x 320`` float32).  Reading is greedy
CTC: arg-max per position, repeats merged, blanks (index 0) dropped; the
alphabet is the model's metadata ``character`` with the blank first and a
space last, as rapidocr builds it.

Needs Pillow (``pip install -e .[bench]``) and Debian's ``fonts-dejavu-core``
(``/usr/share/fonts/truetype/dejavu``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

HEIGHT, WIDTH = 48, 320
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
CALIBRATION_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf")
HELD_OUT_FONTS = ("DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSansCondensed.ttf",
                  "DejaVuSans-Oblique.ttf", "DejaVuSerif-Bold.ttf")

CALIBRATION_WORDS = ["harbour", "lantern", "quarry", "violet", "meadow", "cobalt", "pepper", "thunder", "saddle", "orbit", "wicker", "falcon", "granite", "mosaic", "tundra", "bishop", "cactus", "ember", "velvet", "juniper", "plaza", "rocket", "walnut", "gossip", "Winter", "Monday", "Oxford", "ledger", "1984", "tariff", "zebra", "nickel"]

HELD_OUT_WORDS = ["anchor", "blossom", "cabinet", "dolphin", "eclipse", "fiddle", "glacier", "hammock", "island", "jigsaw", "kettle", "lobster", "marble", "nectar", "octopus", "pebble", "quiver", "raccoon", "salmon", "tablet", "umbrella", "vintage", "whistle", "xylophone", "yogurt", "zipper", "bamboo", "candle", "drizzle", "engine", "feather", "garlic", "helmet", "insect", "jacket", "kitten", "ladder", "magnet", "napkin", "oyster", "parrot", "quartz", "ribbon", "scooter", "teapot", "unicorn", "vessel", "waffle", "yonder", "zephyr", "acorn", "buckle", "crayon", "dagger", "elbow", "fossil", "goblet", "hurdle", "igloo", "jungle", "kernel", "lizard", "muffin", "needle", "orchid", "puzzle", "quokka", "rhubarb", "Sunday", "Berlin", "Madrid", "April", "Kelvin", "Denver", "Quebec", "Nordic", "Tokyo", "Python", "Invoice", "Station", "Ticket", "Exit", "Platform", "Gate", "Total", "Receipt", "Coffee", "Market"]

#: Characters of the random codes of the held-out set.
CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"


def alphabet(model: onnx.ModelProto) -> list[str]:
    """The recognizer's classes: blank, the metadata's characters, a space."""
    chars = next(p.value for p in model.metadata_props if p.key == "character").splitlines()
    return ["<blank>", *chars, " "]


def read(scores: np.ndarray, classes: list[str]) -> list[str]:
    """Greedy CTC reading of ``scores`` ``(N, T, K)``."""
    texts = []
    for best in np.asarray(scores).argmax(-1):
        keep = np.ones(len(best), bool)
        keep[1:] = best[1:] != best[:-1]
        texts.append("".join(classes[i] for i in best[keep] if i != 0))
    return texts


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ca != cb))
    return row[-1]


def accuracy(texts: list[str], truths: list[str]) -> tuple[float, float]:
    """``(word accuracy, character accuracy)`` in percent: exact matches, and
    ``1 - sum(edit distances) / sum(true lengths)``."""
    words = 100.0 * np.mean([t == g for t, g in zip(texts, truths)])
    edits = sum(edit_distance(t, g) for t, g in zip(texts, truths))
    chars = 100.0 * (1 - edits / sum(len(g) for g in truths))
    return float(words), float(chars)


def _render(word: str, font_file: str, size: int, ink: int, paper: int) -> np.ndarray:
    """``word`` as a grayscale uint8 image, cropped to the text with a margin."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(FONT_DIR / font_file), size)
    left, top, right, bottom = font.getbbox(word)
    margin = size // 4
    image = Image.new("L", (right - left + 2 * margin, bottom - top + 2 * margin), paper)
    ImageDraw.Draw(image).text((margin - left, margin - top), word, fill=ink, font=font)
    return np.asarray(image)


def _prepare(gray: np.ndarray) -> np.ndarray:
    """A grayscale image as the recognizer's ``3 x 48 x 320`` input (see the module doc)."""
    from PIL import Image

    height, width = gray.shape
    resized_width = min(WIDTH, int(np.ceil(HEIGHT * width / height)))
    resized = np.asarray(Image.fromarray(gray).resize((resized_width, HEIGHT), Image.BILINEAR))
    out = np.zeros((3, HEIGHT, WIDTH), np.float32)
    out[:, :, :resized_width] = resized.astype(np.float32) / 127.5 - 1.0
    return out


def _degrade(gray: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    image = gray.astype(np.float32)
    if kind == "gauss":
        image += rng.normal(0, 12, image.shape)
    elif kind == "light":
        image += rng.normal(0, 4, image.shape)
    elif kind == "strong_gauss":
        image += rng.normal(0, 22, image.shape)
    elif kind == "blur":
        padded = np.pad(image, 1, mode="edge")
        image = sum(padded[i:i + image.shape[0], j:j + image.shape[1]]
                    for i in range(3) for j in range(3)) / 9
    elif kind == "specks":
        specks = rng.random(image.shape)
        image[specks < 0.02] = 0
        image[specks > 0.98] = 255
    return np.clip(image, 0, 255).astype(np.uint8)


def calibration_set(count: int = 32, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``(images N x 3 x 48 x 320, words)`` for calibration (see the module doc)."""
    rng = np.random.default_rng(seed)
    images, words = [], []
    for index in range(count):
        word = CALIBRATION_WORDS[index % len(CALIBRATION_WORDS)]
        gray = _render(word, CALIBRATION_FONTS[index % 2], int(rng.integers(30, 40)),
                       ink=int(rng.integers(0, 40)), paper=int(rng.integers(220, 256)))
        images.append(_prepare(_degrade(gray, "gauss", rng)))
        words.append(word)
    return np.stack(images), words


def held_out_set(count: int = 200, seed: int = 1, degraded: bool = True
                 ) -> tuple[np.ndarray, list[str]]:
    """``(images, words)`` of the held-out set: other words and random codes, other
    fonts, other degradations (see the module doc); ``degraded=False``: light noise
    only (a clean scan of the same kind of text)."""
    rng = np.random.default_rng(seed)
    images, words = [], []
    for index in range(count):
        if index % 3 == 2:
            word = "".join(rng.choice(list(CODE_ALPHABET), int(rng.integers(4, 8))))
        else:
            word = HELD_OUT_WORDS[int(rng.integers(len(HELD_OUT_WORDS)))]
        font = HELD_OUT_FONTS[int(rng.integers(len(HELD_OUT_FONTS)))]
        gray = _render(word, font, int(rng.integers(26, 46)), ink=int(rng.integers(0, 70)),
                       paper=int(rng.integers(190, 256)))
        kind = (("strong_gauss", "blur", "specks")[int(rng.integers(3))] if degraded
                else "light")  # drawn apart from the word-or-code choice: not confounded
        images.append(_prepare(_degrade(gray, kind, rng)))
        words.append(word)
    return np.stack(images), words
