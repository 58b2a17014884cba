"""The scale bench's plot: peak-memory ratio and step-time ratio over plain fine-tuning against parameter count (log
scale), one line per method, drawn with PIL (matplotlib is not a dependency) into a PNG."""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from bench.scale_nets import ROWS

COLOURS = {"plain": (110, 110, 110), "teacher": (160, 120, 60), "guidance_distillation": (31, 119, 180),
           "dmd_lora_bf16": (214, 39, 40), "dmd_copy": (148, 103, 189), "fdistill_gan": (255, 127, 14),
           "erasure": (44, 160, 44)}
W, H, PAD = 560, 420, 60  # one panel


def _panel(draw: ImageDraw.ImageDraw, x0: int, title: str, series: dict[str, list[tuple[float, float]]],
           xs: tuple[float, float], ys: tuple[float, float], refs: tuple[tuple[float, str], ...] = (),
           hollow: dict[str, list[tuple[float, float]]] | None = None) -> None:
    """Axes, ticks, dashed reference levels `refs` ((ratio, label)) and one polyline per series ([(params, ratio)])
    in the panel whose left edge is x0."""
    left, right, top, bottom = x0 + PAD, x0 + W - 20, 40, H - PAD
    lx = (math.log10(xs[0]), math.log10(xs[1]))

    def px(p: float, r: float) -> tuple[float, float]:
        u = (math.log10(p) - lx[0]) / (lx[1] - lx[0] or 1)
        v = (r - ys[0]) / (ys[1] - ys[0] or 1)
        return left + u * (right - left), bottom - v * (bottom - top)

    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text((left, 12), title, fill=(0, 0, 0))
    for e in range(math.floor(lx[0]), math.ceil(lx[1]) + 1):
        p = 10.0 ** e
        if xs[0] <= p <= xs[1]:
            x, _ = px(p, ys[0])
            draw.line([x, bottom, x, bottom + 5], fill=(0, 0, 0))
            draw.text((x - 14, bottom + 8), f"{p / 1e6:g}M", fill=(0, 0, 0))
    step = _nice_step(ys[1] - ys[0])
    r = math.ceil(ys[0] / step) * step
    while r <= ys[1] + 1e-9:
        _, y = px(xs[0], r)
        draw.line([left - 5, y, left, y], fill=(0, 0, 0))
        draw.line([left, y, right, y], fill=(225, 225, 225))
        draw.text((left - 40, y - 6), f"{r:.2f}", fill=(0, 0, 0))
        r += step
    draw.text((left + (right - left) // 2 - 60, bottom + 28), "network parameters (log)", fill=(0, 0, 0))
    for level, label in refs:
        if ys[0] <= level <= ys[1]:
            _, y = px(xs[0], level)
            for x in range(int(left), int(right), 12):
                draw.line([x, y, min(x + 6, right), y], fill=(90, 90, 90))
            draw.text((right - 7 * len(label) - 4, y - 13), label, fill=(90, 90, 90))
    for row, points in series.items():
        pts = [px(p, v) for p, v in sorted(points)]
        if len(pts) > 1:
            draw.line(pts, fill=COLOURS.get(row, (0, 0, 0)), width=2)
        for x, y in pts:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLOURS.get(row, (0, 0, 0)))
    for row, points in (hollow or {}).items():  # rows that did not fit: their arithmetic ratio
        for x, y in (px(p, v) for p, v in points):
            draw.ellipse([x - 5, y - 5, x + 5, y + 5], outline=COLOURS.get(row, (0, 0, 0)), width=2)


def _nice_step(span: float) -> float:
    raw = span / 6 or 0.1
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def plot(records: list[dict], s: dict, path: Path) -> Path:
    """scale.png: left, peak memory x plain (hollow: the arithmetic of rows that did not fit); right, step time x plain;
    no gradient checkpointing, against parameters."""
    panels, hollow = {"x_plain": {}, "step_x": {}}, {}
    for r in records:
        if r["ckpt"] or r["size"] not in (s["size"], 8):
            continue
        if r.get("status") == "ok" and r.get("x_plain") is not None:
            for key in panels:
                panels[key].setdefault(r["row"], []).append((r["P"], r[key]))
        elif r.get("status", "").startswith("does not fit") and r.get("arith_x") is not None:
            hollow.setdefault(r["row"], []).append((r["P"], r["arith_x"]))
    img = Image.new("RGB", (2 * W, H + 22 * ((len(ROWS) + 1) // 2 + 1) + 12), "white")
    draw = ImageDraw.Draw(img)
    values = [p for panel in (*panels.values(), hollow) for pts in panel.values() for p in pts]
    if values:
        xs = (min(p for p, _ in values) / 1.5, max(p for p, _ in values) * 1.5)
        for i, (key, title) in enumerate((("x_plain", "peak memory / plain fine-tuning"),
                                          ("step_x", "step time / plain fine-tuning"))):
            memory = key == "x_plain"
            ys = [v for panel in ((panels[key], hollow) if memory else (panels[key],)) for pts in panel.values()
                  for _, v in pts] or [1.0]
            refs = ((1.3, "goal 1.3x"), (1.125, "DMD-LoRA limit 1.125x")) if memory else ()
            _panel(draw, i * W, title, panels[key], xs, (min(0.0, min(ys)), max(max(ys), 1.3) * 1.1), refs,
                   hollow if memory else None)
    else:
        draw.text((PAD, H // 2), "no measured rows", fill=(0, 0, 0))
    for i, row in enumerate(ROWS):
        x, y = PAD + (i % 2) * W, H + 4 + 22 * (i // 2)
        draw.rectangle([x, y + 3, x + 14, y + 13], fill=COLOURS[row])
        draw.text((x + 20, y + 2), ROWS[row][0], fill=(0, 0, 0))
    draw.text((PAD, H + 6 + 22 * ((len(ROWS) + 1) // 2)), "hollow circle: did not fit in memory, drawn at its "
              "arithmetic ratio (bytes per parameter per copy)", fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
