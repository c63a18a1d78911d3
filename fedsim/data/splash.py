"""Procedural side-view images of an ethanol drop hitting a dry surface: splash or no splash.

A stand-in for the high-speed images of Yee, Yamanaka & Tagawa (arXiv 2201.09541), which are not
public. Each sample starts from a continuous latent, the impact height h (4-60 cm, log-uniform);
its label is the threshold alone, splash iff h > 20 cm. The picture is a backlit side view taken
around the moment half the drop has impacted, at one of several phases, stored as the inverted
shadowgraph (liquid bright on a dark background, the surface a bright line seen edge-on): a
mostly-zero input, on which a plain FNN trains several times faster than on the raw bright frame.
It shows

* the main body: an ellipse truncated by the substrate, taller (a higher contour) the harder it
  hits: the feature the paper's weight map shows;
* the lamella at its foot: short and thick when it does not splash, thin and lifted when it does;
* when it splashes, small secondary droplets ejected near the lamella's tips.

What decides the picture is not h itself but h with scatter, as in repeated experiments: whether
droplets are ejected follows log(h/20) plus a small scatter (so images near the threshold are
ambiguous and no classifier is perfect); the body's contour height follows it with a larger
scatter and the lamella's shape with a larger one still (real but weaker cues: what the paper's
main-body-only retraining has left). Position jitter (±2 px), radius jitter (±5 %), several
phases, illumination and pixel noise come on top. Everything is drawn from one seed.

`sample_drops` draws the latents and geometry; `render_drops` draws the images, with or without
the droplets (the main-body-only variant: the same drops, the same noise, no droplets).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64
SUBSTRATE_ROW = 50  # rows >= this are below the surface, which is the line y = SUBSTRATE_ROW - 0.5
SURFACE_Y = SUBSTRATE_ROW - 0.5
SURFACE_LINE_PX = 2  # the surface seen edge-on: a line, the substrate below it unlit
THRESHOLD_CM = 20.0  # ethanol, radius ≈ 1.29 mm, hydrophilic surface (the paper's threshold)
HEIGHT_RANGE_CM = (4.0, 60.0)
RADIUS_PX = 11.0
# Share of the drop's initial diameter below the surface plane: "half impacted" is 0.5.
PHASES = (0.4, 0.5, 0.6)
# Scatter (in log-height units) of what decides the picture, around log(h / threshold).
OUTCOME_SCATTER = 0.04  # droplets or not: the near-threshold ambiguity
BODY_SCATTER = 0.15  # the main body's contour height: a strong cue, concentrated on the contour
LAMELLA_SCATTER = 0.4  # the lamella's length, thickness and lift: a weak cue
BODY_HEIGHT_GAIN = 0.30  # how much higher (× radius) the contour stands after a hard impact
PIXEL_NOISE = 0.04
# Body and lamella never reach above this row (droplets are drawn in their own windows), so the
# vectorised drawing covers rows DRAW_TOP .. SUBSTRATE_ROW only.
DRAW_TOP = SUBSTRATE_ROW - 24
MAX_DROPLETS_PER_SIDE = 4
_CHUNK = 512  # samples rendered at once (bounds the memory of the vectorised drawing)


@dataclass(frozen=True)
class DropGeometry:
    """The latents and shapes of `count` drops (arrays of length count unless noted).

    Body: ellipse centred at (cx, cy) with semi-axes a (horizontal), b (vertical), cut by the
    surface. Lamella on each side: a sheet from the body's foot, `lamella_length` long and
    `lamella_thickness` thick, lifted by `lamella_angle` (radians) off the surface. Droplets:
    (count, 2 · MAX_DROPLETS_PER_SIDE, 3) rows of (x, y, radius), the first `droplet_count` used.
    """

    heights: np.ndarray  # impact height, cm: the continuous latent
    labels: np.ndarray  # 1 = splash (heights > THRESHOLD_CM), 0 = no splash
    phases: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    a: np.ndarray
    b: np.ndarray
    lamella_length: np.ndarray
    lamella_thickness: np.ndarray
    lamella_angle: np.ndarray
    droplets: np.ndarray
    droplet_count: np.ndarray
    background: np.ndarray  # grey level of the background (inverted: dark)
    liquid: np.ndarray  # grey level of the liquid and the surface line (inverted: bright)
    seed: int

    def __len__(self) -> int:
        return len(self.heights)


def sample_drops(count: int, seed: int) -> DropGeometry:
    """Draw `count` drops: heights, labels by the threshold, and the geometry they produce."""
    rng = np.random.default_rng([seed, 0])
    low, high = np.log(HEIGHT_RANGE_CM)
    heights = np.exp(rng.uniform(low, high, count))
    labels = (heights > THRESHOLD_CM).astype(np.int64)
    severity = np.log(heights / THRESHOLD_CM)  # > 0 exactly for the splash class
    ejects = severity + rng.normal(0.0, OUTCOME_SCATTER, count) > 0
    # The body and lamella respond smoothly: 0 = a gentle impact, 1 = a hard one.
    body_shape = _response(severity + rng.normal(0.0, BODY_SCATTER, count))
    shape = _response(severity + rng.normal(0.0, LAMELLA_SCATTER, count))
    phases = rng.choice(PHASES, count)
    radius = RADIUS_PX * rng.uniform(0.95, 1.05, count)
    late = phases - 0.5
    # Harder impacts keep a higher contour (the paper's key feature) and spread the lamella
    # further, thinner and lifted off the surface; later phases flatten the body a little.
    b = radius * (0.82 + BODY_HEIGHT_GAIN * body_shape) * (1.0 - 0.2 * late)
    a = radius * (1.15 - 0.10 * body_shape) * (1.0 + 0.4 * late)
    cy = SURFACE_Y - radius * (1.0 - 2.0 * phases)
    cx = (IMAGE_SIZE - 1) / 2 + rng.uniform(-2.0, 2.0, count)
    lamella_length = radius * (0.35 + 0.55 * shape) * (0.7 + 0.6 * phases)
    lamella_thickness = 3.6 - 2.4 * shape
    lamella_angle = np.deg2rad(30.0) * shape
    droplets, droplet_count = _eject_droplets(
        rng, ejects, severity, cx, cy, a, b, lamella_length, lamella_thickness, lamella_angle
    )
    return DropGeometry(
        heights=heights,
        labels=labels,
        phases=phases,
        cx=cx,
        cy=cy,
        a=a,
        b=b,
        lamella_length=lamella_length,
        lamella_thickness=lamella_thickness,
        lamella_angle=lamella_angle,
        droplets=droplets,
        droplet_count=droplet_count,
        background=rng.uniform(0.05, 0.15, count),
        liquid=rng.uniform(0.85, 0.95, count),
        seed=seed,
    )


def _response(latent: np.ndarray) -> np.ndarray:
    """A shape's smooth response to the (scattered) severity: 0 gentle, 1 hard, 0.5 at the threshold."""
    return 1.0 / (1.0 + np.exp(-latent / 0.25))


def _foot_x(cx: np.ndarray, cy: np.ndarray, a: np.ndarray, b: np.ndarray, side: int) -> np.ndarray:
    """Where the body's contour meets the surface on `side` (±1)."""
    rise = np.clip((SURFACE_Y - cy) / b, -1.0, 1.0)
    return cx + side * a * np.sqrt(1.0 - rise**2)


def _sheet_axes(angle: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors along the sheet (outward, rising by `angle`) and across it (upward)."""
    along = np.stack([side * np.cos(angle), -np.sin(angle)], axis=-1)
    across = np.stack([-side * np.sin(angle), -np.cos(angle)], axis=-1)
    return along, across


def _eject_droplets(
    rng: np.random.Generator,
    ejects: np.ndarray,
    severity: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    length: np.ndarray,
    thickness: np.ndarray,
    angle: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Secondary droplets flying up and out from each lamella tip, more of them the harder the impact;
    those that have left the frame are not drawn.

    Every random number is drawn for every sample (used or not), so a drop's draw never depends
    on its neighbours' outcomes."""
    count = len(ejects)
    slots = MAX_DROPLETS_PER_SIDE
    droplets = np.zeros((count, 2 * slots, 3))
    keep = np.zeros((count, 2 * slots), dtype=bool)
    per_side = 2 + np.minimum(rng.poisson(1.0 + 1.0 * np.clip(severity, 0, None), (2, count)), slots - 2)
    gaps = rng.uniform(1.5, 4.0, (2, slots, count))
    # Ejected upwards and outwards from the rim, 15-45 degrees above the surface.
    elevations = np.deg2rad(rng.uniform(15.0, 45.0, (2, slots, count)))
    radii = rng.uniform(1.1, 2.0, (2, slots, count))
    for s_index, side in enumerate((-1, 1)):
        along, across = _sheet_axes(angle, side)
        foot = np.stack([_foot_x(cx, cy, a, b, side), np.full(count, SURFACE_Y)], axis=-1)
        tip = foot + length[:, None] * along + (thickness / 2)[:, None] * across
        reach = np.zeros(count)
        for slot in range(slots):
            r = radii[s_index, slot]
            reach = reach + gaps[s_index, slot] + r
            elevation = elevations[s_index, slot]
            flight = np.stack([side * np.cos(elevation), -np.sin(elevation)], axis=-1)
            centre = tip + reach[:, None] * flight
            reach = reach + r
            column = s_index * slots + slot
            in_frame = (centre[:, 0] >= 1.0) & (centre[:, 0] <= IMAGE_SIZE - 2.0)
            keep[:, column] = ejects & in_frame & (slot < per_side[s_index])
            y = np.minimum(centre[:, 1], SURFACE_Y - r - 1.0)  # airborne: clear of the surface
            droplets[:, column] = np.stack([centre[:, 0], y, r], axis=-1)
    packed = np.zeros_like(droplets)  # the drawn droplets first, so droplet_count says which
    droplet_count = keep.sum(axis=1)
    for i in np.flatnonzero(droplet_count):
        packed[i, : droplet_count[i]] = droplets[i, keep[i]]
    return packed, droplet_count.astype(np.int64)


def _coverage(signed_distance: np.ndarray) -> np.ndarray:
    """Anti-aliased pixel coverage from a signed distance (negative inside), a half-pixel ramp."""
    return np.clip(0.5 - signed_distance, 0.0, 1.0)


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) of the band of rows the body and lamella can reach."""
    rows, cols = np.mgrid[DRAW_TOP:SUBSTRATE_ROW, 0:IMAGE_SIZE].astype(np.float32)
    return cols, rows


def _column(values: np.ndarray, index: slice) -> np.ndarray:
    return values[index, None, None].astype(np.float32)


def _body_band(geometry: DropGeometry, index: slice) -> np.ndarray:
    x, y = _grid()
    dx, dy = x - _column(geometry.cx, index), y - _column(geometry.cy, index)
    a, b = _column(geometry.a, index), _column(geometry.b, index)
    rho = np.sqrt(dx**2 + dy**2)
    level = np.sqrt((dx / a) ** 2 + (dy / b) ** 2)
    # Radial distance to the contour, rho·(1 − 1/level): close to the true distance for these
    # mild ellipses, and exact on the axes.
    return _coverage(rho * (1.0 - 1.0 / np.maximum(level, 1e-6)))


def body_coverage(geometry: DropGeometry, index: slice = slice(None)) -> np.ndarray:
    """The main body's coverage (N, H, W) in [0, 1]: the ellipse above the surface only."""
    band = _body_band(geometry, index)
    cover = np.zeros((len(band), IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    cover[:, DRAW_TOP:SUBSTRATE_ROW] = band
    return cover


def _lamella_band(geometry: DropGeometry, index: slice) -> np.ndarray:
    x, y = _grid()
    dy = y - np.float32(SURFACE_Y)
    length = _column(geometry.lamella_length, index) + 1.0
    thick = _column(geometry.lamella_thickness, index)
    cover = np.zeros((len(length), *x.shape), dtype=np.float32)
    for side in (-1, 1):
        along, across = (
            v.astype(np.float32)[:, :, None, None] for v in _sheet_axes(geometry.lamella_angle[index], side)
        )
        # Start a pixel inside the body so that sheet and body are one piece of liquid.
        foot_x = _foot_x(geometry.cx[index], geometry.cy[index], geometry.a[index], geometry.b[index], side)
        dx = x - (foot_x - side * 1.0).astype(np.float32)[:, None, None]
        u = dx * along[:, 0] + dy * along[:, 1]
        v = dx * across[:, 0] + dy * across[:, 1]
        signed = np.maximum(np.maximum(-u, u - length), np.maximum(-v, v - thick))
        np.maximum(cover, _coverage(signed), out=cover)
    return cover


# A droplet (radius <= 2) covers pixel centres within 2.5 px of its centre: a 7×7 window does.
_DROPLET_WINDOW = 7


def _add_droplets(cover: np.ndarray, geometry: DropGeometry, start: int) -> None:
    """Paint the droplets of samples start .. start + len(cover) into `cover` (in place), all at
    once: each droplet's coverage is computed in a small window around it."""
    samples = np.arange(start, start + len(cover))
    used = np.arange(geometry.droplets.shape[1])[None, :] < geometry.droplet_count[samples, None]
    owner, slot = np.nonzero(used)
    x0, y0, r = (geometry.droplets[samples[owner], slot, k, None, None] for k in range(3))
    offsets = np.arange(_DROPLET_WINDOW) - _DROPLET_WINDOW // 2
    rows = np.clip(np.floor(y0) + offsets[None, :, None], 0, IMAGE_SIZE - 1).astype(np.intp)
    cols = np.clip(np.floor(x0) + offsets[None, None, :], 0, IMAGE_SIZE - 1).astype(np.intp)
    disks = _coverage(np.sqrt((cols - x0) ** 2 + (rows - y0) ** 2) - r).astype(np.float32)
    flat = (owner[:, None, None] * IMAGE_SIZE + rows) * IMAGE_SIZE + cols
    np.maximum.at(cover.reshape(-1), flat.ravel(), disks.ravel())


def liquid_coverage(geometry: DropGeometry, droplets: bool = True) -> np.ndarray:
    """Coverage (N, H, W) of everything bright: body, lamella, surface line and (optionally)
    droplets."""
    cover = np.empty((len(geometry), IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for start in range(0, len(geometry), _CHUNK):
        part = slice(start, min(start + _CHUNK, len(geometry)))
        chunk = np.zeros((part.stop - start, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
        chunk[:, DRAW_TOP:SUBSTRATE_ROW] = np.maximum(
            _body_band(geometry, part), _lamella_band(geometry, part)
        )
        chunk[:, SUBSTRATE_ROW : SUBSTRATE_ROW + SURFACE_LINE_PX] = 1.0
        if droplets:
            _add_droplets(chunk, geometry, start)
        cover[part] = chunk
    return cover


def render_drops(geometry: DropGeometry, droplets: bool = True, noise: bool = True) -> np.ndarray:
    """The images, float32 (N, 1, 64, 64) in [0, 1]: bright liquid on a dark background.

    `droplets=False` is the main-body-only variant; the pixel noise is drawn from the geometry's
    seed, so both variants of a drop differ only where its droplets are."""
    cover = liquid_coverage(geometry, droplets)
    background = geometry.background[:, None, None].astype(np.float32)
    liquid = geometry.liquid[:, None, None].astype(np.float32)
    images = background + (liquid - background) * cover
    if noise:
        rng = np.random.default_rng([geometry.seed, 1])
        # Uniform noise of std PIXEL_NOISE: several times cheaper to draw than Gaussian.
        spread = np.float32(PIXEL_NOISE * np.sqrt(12.0))
        images += spread * (rng.random(images.shape, dtype=np.float32) - np.float32(0.5))
    return np.clip(images, 0.0, 1.0)[:, None]


def splash_images(count: int, seed: int, droplets: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`count` drop images (N, 1, 64, 64), their labels (1 = splash) and impact heights (cm)."""
    geometry = sample_drops(count, seed)
    return render_drops(geometry, droplets), geometry.labels, geometry.heights.astype(np.float32)
