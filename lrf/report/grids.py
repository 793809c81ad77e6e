"""Image grids: photo | vanilla | full | rgb-3dgs for a few test views per scene."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from lrf.report.collect import GRID_METHODS, _is_num, Run


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _fit_cell(img, max_w: int = 320, min_w: int = 128):
    """Large renders are shrunk (keeps the HTML small); tiny ones are blown up with nearest pixels."""
    from PIL import Image

    w, h = img.size
    if w > max_w:
        return img.resize((max_w, max(1, round(h * max_w / w))), Image.LANCZOS)
    if w < min_w:
        k = math.ceil(min_w / w)
        return img.resize((w * k, h * k), Image.NEAREST)
    return img


def grid_image(scene_json: Path, runs: dict[str, Run], results_scene: Path, max_views: int = 3) -> bytes | None:
    """photo | vanilla | full | rgb-3dgs (whichever exist) for up to `max_views` test views."""
    from PIL import Image, ImageDraw

    from lrf.scene.model import Scene

    scene = Scene.load(scene_json)
    test = scene.test
    if not test:
        return None
    pick = sorted({test[int(round(t))] for t in np.linspace(0, len(test) - 1, min(max_views, len(test)))})
    cols = ["photo"] + [m for m in GRID_METHODS if m in runs and runs[m].status == "ok"
                        and (results_scene / "eval" / m / "renders").is_dir()]
    if len(cols) == 1:
        return None
    cells: list[list[tuple[object, str]]] = []
    for i in pick:
        cam = scene.cameras[i]
        photo = Image.fromarray((np.clip(scene.load_image(i), 0, 1) * 255).round().astype(np.uint8))
        row = [(photo, cam.name)]
        for m in cols[1:]:
            p = results_scene / "eval" / m / "renders" / (Path(cam.name.replace("/", "__")).stem + ".png")
            if p.is_file():
                with Image.open(p) as im:
                    img = im.convert("RGB")
                if img.size != photo.size:
                    img = img.resize(photo.size, Image.BICUBIC)
                pv = next((v for v in runs[m].doc.get("per_view") or [] if v.get("view") == cam.name), {})
                cap = " · ".join(x for x in (f"PSNR {pv['psnr']:.2f}" if _is_num(pv.get("psnr")) else "",
                                           f"LPIPS-alex {pv['lpips_alex']:.3f}" if _is_num(pv.get("lpips_alex")) else "") if x)
                row.append((img, cap))
            else:
                row.append((None, "no render"))
        cells.append(row)
    cw, ch = _fit_cell(cells[0][0][0]).size
    head, cap_h, pad = 24, 18, 4
    W = len(cols) * (cw + pad) + pad
    H = head + len(cells) * (ch + cap_h + pad) + pad
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    f_head, f_cap = _font(15), _font(11)
    for j, c in enumerate(cols):
        draw.text((pad + j * (cw + pad) + cw / 2, head / 2), c, fill="black", font=f_head, anchor="mm")
    for r, row in enumerate(cells):
        y = head + r * (ch + cap_h + pad)
        for j, (img, cap) in enumerate(row):
            x = pad + j * (cw + pad)
            if img is None:
                draw.rectangle([x, y, x + cw - 1, y + ch - 1], fill="#dddddd")
            else:
                canvas.paste(_fit_cell(img).resize((cw, ch)), (x, y))
            draw.text((x + cw / 2, y + ch + cap_h / 2), _clip_text(draw, cap, f_cap, cw), fill="#333333",
                      font=f_cap, anchor="mm")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _clip_text(draw, text: str, font, width: int) -> str:
    """Fit a caption into its cell: drop trailing ' · ' parts first, then truncate."""
    while " · " in text and draw.textlength(text, font=font) > width - 4:
        text = text.rsplit(" · ", 1)[0]
    while text and draw.textlength(text, font=font) > width - 4:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text
