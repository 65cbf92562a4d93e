"""Pseudo-masks from a teacher, on training images only (issue 10, step 1).

The teacher is an exported crackcam model (``.onnx`` with its metadata: the calibrated recipe — CAM prior × pixel
cue, per-tile gate, ROI, threshold, post-processing) run through the runtime's own frame steps
(:class:`crackcam.runtime.steps.FrameSteps`, what ``crack-run`` runs), or — in a self-training round — the
student itself with the teacher's per-tile gate.  Each training image gets one uint8 label image at the **work
scale** (the size the student trains and runs at):

* ``CRACK`` (255): the teacher's binary crack mask (threshold + post-processing), restricted to tiles whose
  tile-rule bit is *crack* when the image has one (the same one bit per tile the classifier trained on) and, in a
  self-training round, to tiles the teacher's gate lets through;
* ``BACKGROUND`` (0): every in-ROI pixel of a crack-free image (``noncrack*`` names, ``no_crack/`` folders, PaveSeg
  crack-free and sealed-crack-only frames, clean tiles) and of every tile whose tile-rule bit is *crack-free* (so
  sealed cracks, joints, patches and manholes are background); in crack images also pixels whose score is below
  ``lo`` × the threshold **and** whose black-hat cue is below its ``cue_quantile`` in that image (smooth pavement,
  not a missed thin crack);
* ``IGNORE`` (127): everything else — the band between, pixels outside the ROI.

The mask is never read for pixel positions: it only gives the tile bits (:func:`crackcam.train.data.tile_labels`).
"""

from __future__ import annotations

import json

from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from crackcam.runtime import cues as C
from crackcam.runtime import survey as S
from crackcam.runtime.imageio import BadInputError, read_image, read_mask, write_image

CRACK, BACKGROUND, IGNORE = 255, 0, 127
NEGATIVE_CLASSES = ("no_crack", "sealed_crack_only", "clean_tile")


@dataclass(frozen=True)
class PseudoRule:
    lo: float = 0.5  # background below lo × threshold (crack images) ...
    cue_quantile: float = 0.8  # ... where the black-hat cue is also below this quantile of the image's cue
    tile_topk: float = 0.0  # > 0: also the top share of each crack tile's scores is crack (a crack tile holds one)
    tile: int = 64  # the tile-rule grid (tile_topk works per tile of it)

    def to_dict(self) -> dict:
        return asdict(self)


def tile_state(mask: np.ndarray | None, shape: tuple, rule) -> np.ndarray | None:
    """Per pixel of a work-scale image of ``shape``: 1 in a *crack* tile, 0 in a *crack-free* tile, -1 in a
    dropped tile or outside the tile grid (``rule``: a :class:`crackcam.train.data.TileRule`); None without a
    mask."""
    from .data import tile_labels

    if mask is None:
        return None
    h, w = shape
    origins, labels = tile_labels(mask, rule)
    st = np.full((h, w), -1, np.int8)
    t = rule.tile
    for (y, x), lab in zip(origins, labels):
        st[y:y + t, x:x + t] = lab
    return st


def pseudo_labels(score: np.ndarray, binary: np.ndarray, threshold: float, *, negative: bool,
                  valid: np.ndarray | None = None, tiles: np.ndarray | None = None, cue: np.ndarray | None = None,
                  gate: np.ndarray | None = None, rule: PseudoRule = PseudoRule()) -> np.ndarray:
    """The pseudo-label image (uint8 CRACK / BACKGROUND / IGNORE) of one work-scale image.

    ``score``: the teacher's map on [0, 1]; ``binary``: its post-processed crack mask; ``valid``: inside the ROI;
    ``tiles``: :func:`tile_state` (None: no tile bits); ``cue``: the black-hat cue (None: the score alone decides
    background); ``gate``: pixels of tiles the teacher's gate lets through (None: all)."""
    h, w = score.shape
    out = np.full((h, w), IGNORE, np.uint8)
    valid = np.ones((h, w), bool) if valid is None else np.asarray(valid, bool)
    if negative:
        out[valid] = BACKGROUND
        return out
    bg = np.asarray(score, np.float32) < float(rule.lo) * float(threshold)
    if cue is not None:
        inside = cue[valid] if valid.any() else cue.reshape(-1)
        q = float(np.quantile(inside, rule.cue_quantile)) if inside.size else 0.0
        bg &= np.asarray(cue, np.float32) <= q
    crack = np.asarray(binary, bool).copy()
    if gate is not None:
        crack &= np.asarray(gate, bool)
    if tiles is not None:
        crack &= tiles == 1
        if rule.tile_topk > 0:
            crack |= _tile_top(np.asarray(score, np.float32), tiles, rule, threshold)
            if gate is not None:
                crack &= np.asarray(gate, bool)
        bg |= tiles == 0
    bg &= ~crack
    out[bg & valid] = BACKGROUND
    out[crack & valid] = CRACK
    return out


def _tile_top(score: np.ndarray, tiles: np.ndarray, rule: PseudoRule, threshold: float) -> np.ndarray:
    """In every *crack* tile (the tile rule says a crack lies inside), the top ``tile_topk`` share of the score —
    where the score is at least ``lo`` × threshold / 2 (an empty teacher map labels nothing)."""
    out = np.zeros(score.shape, bool)
    t = int(rule.tile)
    floor = 0.5 * float(rule.lo) * float(threshold)
    h, w = score.shape
    for y in range(0, h - t + 1, t):
        for x in range(0, w - t + 1, t):
            if tiles[y, x] != 1:
                continue
            blk = score[y:y + t, x:x + t]
            q = float(np.quantile(blk, 1.0 - float(rule.tile_topk)))
            out[y:y + t, x:x + t] = (blk >= max(q, floor)) & (blk > 0)
    return out


def is_negative(it) -> bool:
    """A crack-free training image by its image-level label (names, folders, PaveSeg frame class, clean tiles)."""
    return it.name_label == 0 or (it.image_label in NEGATIVE_CLASSES)


def _work(a: np.ndarray, shape: tuple, interp=cv2.INTER_AREA) -> np.ndarray:
    h, w = shape
    if a.shape[:2] == (h, w):
        return a
    return cv2.resize(a, (w, h), interpolation=interp)


def gate_map(plan: S.FramePlan, tile_probs, survey: S.SurveyConfig) -> np.ndarray:
    """Work-scale bool map of the tiles the survey's per-tile gate lets through (:func:`survey.tile_keep`, the rule
    the frame steps apply)."""
    h, w = plan.work_shape
    m = np.zeros(plan.padded_shape, bool)
    th, tw = plan.tile
    for (y, x), keep in zip(plan.coords, S.tile_keep(plan, tile_probs, survey)):
        if keep:
            m[y:y + th, x:x + tw] = True
    return m[:h, :w]


class Teacher:
    """An exported model (``.onnx``/engine with crackcam metadata) run through the runtime frame steps."""

    def __init__(self, path: Path, log=print):
        from crackcam.runtime.sessions import open_session
        from crackcam.runtime.steps import ModelSteps

        self.path = Path(path)
        self.session = open_session(self.path, log=lambda s: None)
        self.steps = ModelSteps(self.session.meta)
        self.describe = f"{self.path.name} ({self.session.meta.model}, {self.session.meta.method})"

    def __call__(self, rgb: np.ndarray) -> dict:
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        st = self.steps.for_shape(bgr.shape)
        res = st.process(self.session, bgr)
        return {"map": res.map, "binary": res.post.mask, "threshold": float(st.post.threshold),
                "plan": res.plan, "tile_probs": res.tile_probs, "survey": st.survey}


def resolve_teacher(teacher: str | Path | None) -> Path:
    """``--teacher``: an exported model file, or a run folder holding one (``DIR/export/*.onnx``, newest); None →
    the packaged default."""
    if teacher is None:
        from crackcam.runtime.cli import DEFAULT_MODEL

        return DEFAULT_MODEL
    p = Path(teacher)
    if p.is_file():
        return p
    if p.is_dir():
        cands = sorted((p / "export").glob("*.onnx"), key=lambda q: q.stat().st_mtime) if (p / "export").is_dir() \
            else []
        if cands:
            return cands[-1]
        raise FileNotFoundError(f"{p}: no exported model in {p / 'export'}; export the teacher first "
                                f"(crack-export --checkpoint {p})")
    raise FileNotFoundError(f"{p}: teacher not found (an exported .onnx or a crack-train run folder)")


def make_pseudo_masks(items_by_set: dict[str, list], out: Path, teacher_fn, tile_rule, *, rule: PseudoRule =
                      PseudoRule(), student_fn=None, log=print, progress=True) -> dict:
    """Write ``out/masks/<set>__<stem>.png`` (work-scale pseudo-labels), ``out/manifest.jsonl`` and
    ``out/preview.png`` for every training item; returns the summary (also ``out/summary.json``).

    ``teacher_fn(rgb) -> dict`` (:class:`Teacher`); ``student_fn(rgb, plan) -> (work-scale prob map, threshold,
    binary)`` for a self-training round (the student's confident pixels, inside the teacher's gated tiles).
    Resumable: images already in the manifest are skipped."""
    from crackcam.runtime.progress import progress as prog

    out = Path(out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    man_path = out / "manifest.jsonl"
    done = {}
    if man_path.is_file():
        for line in man_path.read_text().splitlines():
            try:
                r = json.loads(line)
                if (out / "masks" / r["label"]).is_file():
                    done[r["key"]] = r
            except (json.JSONDecodeError, KeyError):
                continue
    todo = [(s, it) for s, its in items_by_set.items() for it in its]
    rows = list(done.values())
    skipped = []
    with open(man_path, "a") as man:
        for set_name, it in (prog(todo, desc="pseudo-masks", unit="img", every=50) if progress else todo):
            key = f"{set_name}/{it.image.name}"
            if key in done:
                continue
            try:
                rgb = read_image(it.image)
                t = teacher_fn(rgb)
                plan = t["plan"]
                wshape = tuple(plan.work_shape)
                valid = S.roi_mask(rgb.shape[:2], t["survey"])
                valid_w = None if valid is None else _work(valid.astype(np.uint8), wshape, cv2.INTER_NEAREST) > 0
                tiles = None
                if it.mask is not None and not is_negative(it):
                    from .data import scaled_mask

                    m = read_mask(it.mask, rgb.shape)
                    tiles = tile_state(scaled_mask(m, plan.scale), wshape, tile_rule)
                wimg = _work(rgb, wshape)
                if student_fn is None:
                    score = _work(t["map"], wshape, cv2.INTER_AREA)
                    binary = _work(t["binary"].astype(np.uint8), wshape, cv2.INTER_NEAREST) > 0
                    thr, gate = t["threshold"], None
                else:
                    score, thr, binary = student_fn(wimg)
                    gate = gate_map(plan, t["tile_probs"], t["survey"])
                lab = pseudo_labels(score, binary, thr, negative=is_negative(it), valid=valid_w, tiles=tiles,
                                    cue=C.cue(wimg, "blackhat"), gate=gate, rule=rule)
            except BadInputError as exc:
                log(f"pseudo-masks: skipping {exc}")
                skipped.append(str(exc))
                continue
            name = f"{set_name}__{it.image.stem}.png"
            write_image(out / "masks" / name, lab)
            r = {"key": key, "set": set_name, "image": str(it.image), "label": name, "work_shape": list(wshape),
                 "scale": plan.scale, "negative": is_negative(it), "tile_bits": tiles is not None,
                 "crack_px": int((lab == CRACK).sum()), "background_px": int((lab == BACKGROUND).sum()),
                 "ignore_px": int((lab == IGNORE).sum())}
            man.write(json.dumps(r) + "\n")
            man.flush()
            rows.append(r)
    tot = {k: int(sum(r[k] for r in rows)) for k in ("crack_px", "background_px", "ignore_px")}
    summary = {"images": len(rows), "negative_images": sum(r["negative"] for r in rows),
               "with_tile_bits": sum(r["tile_bits"] for r in rows), **tot,
               "crack_share_of_labelled": round(tot["crack_px"] / max(1, tot["crack_px"] + tot["background_px"]), 5),
               "ignore_share": round(tot["ignore_px"] / max(1, sum(tot.values())), 4), "rule": rule.to_dict(),
               "skipped": skipped}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_preview(out, rows)
    return summary


def read_pseudo(out: Path, row: dict) -> tuple[np.ndarray, np.ndarray]:
    """(work-scale RGB image, pseudo-label image) of one manifest row."""
    rgb = read_image(row["image"])
    lab = cv2.imread(str(Path(out) / "masks" / row["label"]), cv2.IMREAD_GRAYSCALE)
    if lab is None:
        raise BadInputError(Path(out) / "masks" / row["label"], "cannot read the pseudo-mask")
    h, w = row["work_shape"]
    return np.ascontiguousarray(_work(rgb, (h, w))), lab


def write_preview(out: Path, rows: list[dict], n: int = 8, width: int = 320) -> Path | None:
    """A grid a person can check: image | pseudo-labels (red crack, grey ignore, black background) for the crack
    images with the most crack pixels of each data set and a few negatives."""
    sets = sorted({r["set"] for r in rows})
    per = max(1, (n - 2) // max(1, len(sets)))
    pos = [r for s in sets for r in sorted([r for r in rows if not r["negative"] and r["set"] == s],
                                           key=lambda r: -r["crack_px"])[:per]]  # every data set shows
    neg = [r for r in rows if r["negative"]][:2]
    pick = pos + neg
    if not pick:
        return None
    tiles = []
    for r in pick:
        try:
            img, lab = read_pseudo(out, r)
        except BadInputError:
            continue
        s = width / img.shape[1]
        size = (width, max(1, int(round(img.shape[0] * s))))
        a = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        b = np.zeros_like(a)
        lab_s = cv2.resize(lab, size, interpolation=cv2.INTER_NEAREST)
        b[lab_s == IGNORE] = (110, 110, 110)
        crack = cv2.dilate((lab_s == CRACK).astype(np.uint8), np.ones((2, 2), np.uint8)) > 0
        b[crack] = (255, 40, 40)
        tiles.append(np.concatenate([a, np.full((a.shape[0], 4, 3), 255, np.uint8), b], 1))
    if not tiles:
        return None
    wmax = max(t.shape[1] for t in tiles)
    rows_img = [np.pad(t, ((0, 4), (0, wmax - t.shape[1]), (0, 0)), constant_values=255) for t in tiles]
    grid = np.concatenate(rows_img, 0)
    return write_image(Path(out) / "preview.png", grid)


__all__ = ["CRACK", "BACKGROUND", "IGNORE", "PseudoRule", "Teacher", "gate_map", "is_negative", "make_pseudo_masks",
           "pseudo_labels", "read_pseudo", "resolve_teacher", "tile_state", "write_preview"]

