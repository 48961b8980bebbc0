"""Synthetic benchmark corpus: images rendered at run time with PIL, each with a matching question.

Three kinds of image, the traffic a screenshot/document VLM sees:

* ``screenshot`` — a web page: browser bar with a URL, navigation, a heading, paragraphs, a button (PNG);
* ``document``   — a report page with a title and a table of items, quantities and prices (PNG);
* ``product``    — a product photo: gradient backdrop, a box or bottle with a label and a price tag (JPEG).

Text is English or Chinese. Chinese glyphs need a CJK font; when none is installed (`fc-list :lang=zh`
finds nothing), Chinese *questions* are still asked but the text drawn *in the images* falls back to
English, and :func:`font_note` says so (it is recorded in the benchmark metadata).

Every sample knows the answer to its question (``Sample.answer``), so the same corpus can later check
accuracy; the benchmarks only use the question. Generation is deterministic for a given seed.
"""

from __future__ import annotations

import functools
import io
import random
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

KINDS = ("screenshot", "document", "product")
LANGS = ("en", "zh")
STANDARD_SIZES = ((448, 448), (1288, 728), (1920, 1080))

_CJK_FONT_PATHS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
)
_LATIN_FONT_PATHS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
)

_WORDS = {
    "en": (
        "fast serving of vision language models with streaming answers and paged attention "
        "the scheduler batches requests across many users while the cache keeps keys and values "
        "in fixed size blocks so memory is never wasted and latency stays low under load"
    ).split(),
    "zh": list(
        "视觉语言模型的高效推理服务支持流式输出调度器在多个用户之间批处理请求缓存以固定大小的块保存键值"
    ),
}
_TITLES = {
    "en": ["Quarterly Report", "Release Notes", "Getting Started", "Pricing Plans", "Support Center"],
    "zh": ["季度报告", "版本说明", "快速入门", "价格方案", "帮助中心"],
}
_BUTTONS = {
    "en": ["Sign up", "Buy now", "Download", "Contact us"],
    "zh": ["注册", "立即购买", "下载", "联系我们"],
}
_ITEMS = {
    "en": ["Keyboard", "Monitor", "Cable", "Laptop", "Mouse", "Headset", "Webcam", "Dock"],
    "zh": ["键盘", "显示器", "数据线", "笔记本", "鼠标", "耳机", "摄像头", "扩展坞"],
}
_PRODUCTS = {
    "en": ["Green Tea", "Coffee Beans", "Olive Oil", "Hand Cream", "Honey"],
    "zh": ["绿茶", "咖啡豆", "橄榄油", "护手霜", "蜂蜜"],
}
_QUESTIONS = {
    ("screenshot", "en"): (
        "What is the title of this web page, and what does the button say?",
        "{title}; {button}",
    ),
    ("screenshot", "zh"): ("这个网页的标题是什么？按钮上写的是什么？", "{title}；{button}"),
    ("document", "en"): ("In the table, what is the quantity of {item}?", "{qty}"),
    ("document", "zh"): ("表格中{item}的数量是多少？", "{qty}"),
    ("product", "en"): ("What product is shown and what is its price?", "{name}, {price}"),
    ("product", "zh"): ("图片中是什么产品？价格是多少？", "{name}，{price}"),
}


@dataclass(frozen=True)
class Sample:
    """One benchmark request: encoded image files plus a question about them."""

    images: tuple[bytes, ...]  # encoded files (PNG or JPEG), in prompt order
    question: str
    answer: str  # what the image says, for accuracy checks
    kind: str  # one of KINDS
    lang: str  # one of LANGS
    size: tuple[int, int]  # (width, height) of every image
    messages: str | None = None  # OpenAI-shaped JSON history sent instead of the question (a conversation)


@functools.lru_cache(maxsize=1)
def cjk_font_path() -> str | None:
    """Path of an installed font with Chinese glyphs, or None."""
    if shutil.which("fc-list"):
        try:
            out = subprocess.run(
                ["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=10, check=False
            ).stdout
            files = sorted(line.split(":")[0].strip() for line in out.splitlines() if line.strip())
            # Prefer a regular sans face; any face will do.
            files.sort(key=lambda f: (("Sans" not in f), ("Regular" not in f), f))
            if files:
                return files[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return next((p for p in _CJK_FONT_PATHS if Path(p).exists()), None)


def font_note() -> str:
    """One line on how Chinese text is drawn, for the benchmark metadata."""
    path = cjk_font_path()
    if path:
        return f"CJK font: {path}"
    return (
        "no CJK font found (fc-list :lang=zh is empty; apt-get install fonts-noto-cjk): "
        "Chinese questions are asked, but image text is drawn in English"
    )


@functools.lru_cache(maxsize=64)
def _font(size: int, cjk: bool) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    paths = ([cjk_font_path()] if cjk else []) + list(_LATIN_FONT_PATHS)
    for path in paths:
        if path and Path(path).exists():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size)


def _text_lang(lang: str) -> str:
    """The language drawn inside images: Chinese only when a CJK font exists."""
    return "zh" if lang == "zh" and cjk_font_path() else "en"


def _sentence(rng: random.Random, lang: str, num_words: int) -> str:
    words = [rng.choice(_WORDS[lang]) for _ in range(num_words)]
    return ("" if lang == "zh" else " ").join(words)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, format="JPEG", quality=88)
    else:
        image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _screenshot(rng: random.Random, width: int, height: int, lang: str) -> tuple[Image.Image, dict]:
    tl = _text_lang(lang)
    unit = max(10, height // 36)
    img = Image.new("RGB", (width, height), (250, 250, 252))
    draw = ImageDraw.Draw(img)
    bar = int(unit * 2.2)
    draw.rectangle([0, 0, width, bar], fill=(222, 225, 230))
    draw.rounded_rectangle([unit * 4, bar // 5, width - unit, bar - bar // 5], radius=unit // 2, fill="white")
    slug = rng.choice(["docs", "shop", "news", "help"])
    draw.text(
        (unit * 5, bar // 3), f"https://www.example.com/{slug}", fill=(60, 60, 60), font=_font(unit, False)
    )
    for i, color in enumerate([(237, 106, 94), (245, 191, 79), (98, 197, 84)]):
        cx = unit + i * unit
        draw.ellipse([cx - unit // 3, bar // 2 - unit // 3, cx + unit // 3, bar // 2 + unit // 3], fill=color)
    nav_y = bar + unit // 2
    draw.rectangle([0, bar, width, nav_y + unit * 2], fill=(32, 48, 80))
    x = unit
    for word in _TITLES[tl][:4]:
        draw.text((x, nav_y + unit // 3), word, fill="white", font=_font(unit, tl == "zh"))
        x += int(draw.textlength(word, font=_font(unit, tl == "zh"))) + unit * 2
    title = rng.choice(_TITLES[tl])
    button = rng.choice(_BUTTONS[tl])
    y = nav_y + unit * 3
    draw.text((unit * 2, y), title, fill=(20, 20, 20), font=_font(unit * 2, tl == "zh"))
    y += unit * 3
    sidebar = width - max(unit * 12, width // 4)
    while y < height - unit * 5:
        draw.text(
            (unit * 2, y),
            _sentence(rng, tl, 16 if tl == "zh" else 8),
            fill=(70, 70, 70),
            font=_font(unit, tl == "zh"),
        )
        y += int(unit * 1.6)
    draw.rectangle([sidebar, nav_y + unit * 3, width - unit, height - unit], fill=(238, 241, 246))
    by = nav_y + unit * 4
    bw = int(draw.textlength(button, font=_font(unit, tl == "zh"))) + unit * 2
    draw.rounded_rectangle(
        [sidebar + unit, by, sidebar + unit + bw, by + unit * 2], radius=unit // 2, fill=(0, 110, 230)
    )
    draw.text((sidebar + unit * 2, by + unit // 3), button, fill="white", font=_font(unit, tl == "zh"))
    return img, {"title": title, "button": button}


def _document(rng: random.Random, width: int, height: int, lang: str) -> tuple[Image.Image, dict]:
    tl = _text_lang(lang)
    unit = max(10, height // 40)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    title = rng.choice(_TITLES[tl])
    draw.text((unit * 2, unit), title, fill="black", font=_font(int(unit * 1.8), tl == "zh"))
    draw.text((unit * 2, unit * 4), _sentence(rng, tl, 10), fill=(60, 60, 60), font=_font(unit, tl == "zh"))
    header = {"en": ["Item", "Qty", "Unit price", "Total"], "zh": ["项目", "数量", "单价", "合计"]}[tl]
    items = rng.sample(_ITEMS[tl], k=min(len(_ITEMS[tl]), max(3, (height - unit * 9) // (unit * 2) - 1)))
    rows = [(it, rng.randint(1, 99), rng.randint(5, 999)) for it in items]
    x0, y0 = unit * 2, unit * 6
    col_w = (width - unit * 4) // 4
    row_h = int(unit * 1.9)
    for r, cells in enumerate([header] + [[n, str(q), f"{p}.00", f"{q * p}.00"] for n, q, p in rows]):
        y = y0 + r * row_h
        if y + row_h > height - unit:
            break
        draw.rectangle(
            [x0, y, x0 + col_w * 4, y + row_h],
            fill=(230, 236, 245) if r == 0 else None,
            outline=(150, 150, 150),
        )
        for c, cell in enumerate(cells):
            draw.line([x0 + c * col_w, y, x0 + c * col_w, y + row_h], fill=(150, 150, 150))
            draw.text(
                (x0 + c * col_w + unit // 2, y + unit // 3), cell, fill="black", font=_font(unit, tl == "zh")
            )
    item, qty, _ = rows[0]
    q_item = item if lang == tl else _ITEMS[lang][_ITEMS[tl].index(item)]
    return img, {"item": q_item, "qty": str(qty)}


def _product(rng: random.Random, width: int, height: int, lang: str) -> tuple[Image.Image, dict]:
    tl = _text_lang(lang)
    top, bottom = [rng.randint(120, 235) for _ in range(3)], [rng.randint(40, 160) for _ in range(3)]
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    for y in range(height):
        t = y / max(1, height - 1)
        draw.line(
            [0, y, width, y], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        )
    cx, cy = width // 2, height // 2
    w, h = int(min(width, height) * 0.35), int(min(width, height) * 0.6)
    body = tuple(rng.randint(30, 220) for _ in range(3))
    if rng.random() < 0.5:
        draw.rounded_rectangle(
            [cx - w // 2, cy - h // 2, cx + w // 2, cy + h // 2], radius=w // 10, fill=body
        )
    else:
        draw.ellipse([cx - w // 2, cy - h // 2, cx + w // 2, cy + h // 2], fill=body)
    name = rng.choice(_PRODUCTS[tl])
    price = f"¥{rng.randint(9, 399)}.{rng.choice(['00', '50', '99'])}"
    unit = max(10, h // 10)
    label_h = int(unit * 1.8)
    draw.rectangle(
        [cx - w // 2 + unit // 2, cy - label_h // 2, cx + w // 2 - unit // 2, cy + label_h // 2], fill="white"
    )
    draw.text((cx, cy), name, fill="black", font=_font(unit, tl == "zh"), anchor="mm")
    tag = [cx + w // 2 + unit // 2, cy + h // 4, cx + w // 2 + unit * 7, cy + h // 4 + unit * 2]
    draw.rounded_rectangle(tag, radius=unit // 3, fill=(255, 230, 60))
    draw.text(
        ((tag[0] + tag[2]) // 2, (tag[1] + tag[3]) // 2),
        price,
        fill="black",
        font=_font(unit, False),
        anchor="mm",
    )
    q_name = name if lang == tl else _PRODUCTS[lang][_PRODUCTS[tl].index(name)]
    return img, {"name": q_name, "price": price}


_RENDERERS = {
    "screenshot": (_screenshot, "PNG"),
    "document": (_document, "PNG"),
    "product": (_product, "JPEG"),
}


def make_sample(
    kind: str, size: tuple[int, int], lang: str = "en", seed: int = 0, num_images: int = 1
) -> Sample:
    """Render one sample; the same arguments always give the same bytes."""
    if kind not in _RENDERERS:
        raise ValueError(f"kind: {kind!r} is not one of {KINDS}")
    if lang not in LANGS:
        raise ValueError(f"lang: {lang!r} is not one of {LANGS}")
    width, height = size
    if width < 28 or height < 28:
        raise ValueError(f"size: {width}x{height} is under the 28x28 minimum")
    render, fmt = _RENDERERS[kind]
    rng = random.Random(f"{kind}-{width}x{height}-{lang}-{seed}")
    images, facts = [], {}
    for i in range(num_images):
        img, found = render(rng, width, height, lang)
        images.append(_encode(img, fmt))
        if i == 0:
            facts = found
    question, answer = _QUESTIONS[(kind, lang)]
    return Sample(
        tuple(images), question.format(**facts), answer.format(**facts), kind, lang, (width, height)
    )


def _make_sample_args(args: tuple) -> Sample:
    kind, size, lang, seed, num_images = args
    return make_sample(kind, size, lang, seed=seed, num_images=num_images)


def parse_size(text: str) -> tuple[int, int]:
    """'1288x728' -> (1288, 728)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"image size: {text!r} is not WIDTHxHEIGHT, e.g. 1288x728") from None
    return w, h


class Corpus:
    """A fixed pool of samples cycling over kinds, languages and sizes; ``sample(i)`` wraps around.

    The pool is rendered once up front (a 1920x1080 PNG takes tens of ms to encode), so drawing
    requests costs nothing while load is generated. Images repeat after ``pool_size`` requests.
    """

    def __init__(
        self,
        sizes: Sequence[tuple[int, int]] = ((1288, 728),),
        kinds: Sequence[str] = KINDS,
        langs: Sequence[str] = LANGS,
        num_images: int = 1,
        pool_size: int = 24,
        seed: int = 0,
        workers: int = 1,
    ) -> None:
        """``workers`` > 1 renders the pool in that many processes (the same samples, faster)."""
        combos = [(k, s, lang) for s in sizes for k in kinds for lang in langs]
        count = max(pool_size, len(combos))
        args = [(*combos[i % len(combos)], seed + i, num_images) for i in range(count)]
        if workers > 1 and count > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(min(workers, count)) as pool:
                self.samples = list(pool.map(_make_sample_args, args, chunksize=4))
        else:
            self.samples = [_make_sample_args(a) for a in args]

    def __len__(self) -> int:
        return len(self.samples)

    def sample(self, index: int) -> Sample:
        return self.samples[index % len(self.samples)]
