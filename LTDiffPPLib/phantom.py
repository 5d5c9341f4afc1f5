"""Digital phantoms: built-in CT samples that need no external data.

:func:`qa_phantom` is a sensitometry phantom in the manner of a CT QA module (e.g. Catphan CTP404): a
water cylinder in air with rods of known attenuation. It is the built-in sample of the demo and the
tests.

:func:`edge_phantom` is a water ellipse in air with an anti-aliased outline: the ideal body edge on which an MTF is
measured by the edge method (as the skin edge of a patient, without the skin and fat layers).

:func:`chest_phantom` (and :func:`chest_phantom_volume`, the same as a :class:`~LTDiffPPLib.io.CTVolume`) is a
procedural digital chest: a seeded, noise-free attenuation map in HU with body wall, lungs with parenchymal texture,
branching pulmonary vessels, airways, nodules, ribs, spine, sternum, heart and great vessels (docs/PHANTOM.md). It is
the ground-truth input of the CT simulator (:mod:`LTDiffPPLib.simulation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .io import CTVolume

#: rod material → HU (nominal values of common sensitometry inserts)
QA_RODS: dict[str, float] = {"air": -1000.0, "lung": -850.0, "fat": -100.0, "acrylic": 120.0, "bone50": 700.0, "teflon": 950.0}


def qa_phantom(
    shape: tuple[int, int, int] = (8, 256, 256),
    spacing_mm: float = 0.8,
    noise_hu: float = 10.0,
    seed: int = 0,
) -> np.ndarray:
    """A (z, y, x) float32 HU volume: air (−1000), a 200 mm water cylinder (0 HU), six rods of 12 mm.

    Rods of :data:`QA_RODS` sit on a ring of radius 60 mm; white Gaussian noise of SD ``noise_hu`` is
    added (seeded). Lengths are in mm at in-plane pixel size ``spacing_mm``.
    """
    nz, ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx].astype(np.float32)
    yy = (yy - (ny - 1) / 2) * spacing_mm
    xx = (xx - (nx - 1) / 2) * spacing_mm
    img = np.full((ny, nx), -1000.0, dtype=np.float32)
    img[xx**2 + yy**2 <= 100.0**2] = 0.0
    for k, hu in enumerate(QA_RODS.values()):
        angle = 2 * np.pi * k / len(QA_RODS)
        cx, cy = 60.0 * np.cos(angle), 60.0 * np.sin(angle)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= 6.0**2] = hu
    rng = np.random.default_rng(seed)
    vol = np.repeat(img[None], nz, axis=0)
    return (vol + rng.normal(0.0, noise_hu, size=vol.shape)).astype(np.float32)


def edge_phantom(size: int = 448, pixel_mm: float = 0.7, semi_axes_mm: tuple[float, float] | None = None,
                 supersample: int = 8) -> np.ndarray:
    """A (y, x) float32 HU slice: a water ellipse (0 HU) in air (−1000 HU), each pixel the exact fraction of its
    area inside the ellipse (``supersample``² sub-pixels), as a detector sees a continuous object.

    ``semi_axes_mm`` (x, y) default to 45 % × 38 % of the field of view (``size`` × ``pixel_mm`` mm): a body-sized
    outline whose every orientation and curvature feeds :func:`LTDiffPPLib.kernels.edge_mtf`.
    """
    fov = size * pixel_mm
    ax, ay = semi_axes_mm or (0.45 * fov, 0.38 * fov)
    c = (np.arange(size * supersample) - (size * supersample - 1) / 2) * (pixel_mm / supersample)
    inside = (c[None, :] / ax) ** 2 + (c[:, None] / ay) ** 2 <= 1.0
    frac = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    return (frac * 1000.0 - 1000.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Digital chest phantom
# ---------------------------------------------------------------------------------------------------------------------
#
# Frame: patient coordinates in mm, DICOM LPS with identity direction, so array axis x (last) runs to the patient's
# left, y (middle) runs posterior, z (first) runs superior. The anatomy is defined analytically in this frame
# (x = y = 0 on the body axis, z = 0 about 25 mm below the carina, at the level of the hila) and rasterised as
# signed distance functions (SDF, mm, negative inside) composited back to front; the partial-volume fraction of a
# voxel is approximated by a linear ramp of the SDF over the voxel's footprint along the surface normal.

#: label id of each tissue class in the ``labels`` volume of :func:`chest_phantom`
PHANTOM_LABELS: dict[str, int] = {
    "air": 0,
    "lung": 1,
    "vessel": 2,  # intrapulmonary arteries and veins
    "airway": 3,  # airway lumen (trachea, bronchi)
    "nodule": 4,
    "bone": 5,  # cortical and trabecular bone (ribs, spine, sternum)
    "soft_tissue": 6,  # skin, muscle, oesophagus, discs, spinal canal, spleen/stomach
    "fat": 7,
    "heart": 8,
    "aorta": 9,  # aorta and the arch branches
    "great_vessel": 10,  # SVC, pulmonary trunk and main pulmonary arteries, pulmonary veins to the atrium
    "airway_wall": 11,
    "liver": 12,
    "cartilage": 13,  # costal cartilage
}

#: nominal tissue values in HU (sources: docs/PHANTOM.md)
TISSUE_HU: dict[str, float] = {
    "air": -1000.0,
    "lung": -850.0,
    "fat": -100.0,
    "skin": 40.0,
    "muscle": 40.0,
    "blood": 40.0,
    "myocardium": 45.0,
    "myocardium_contrast": 100.0,
    "airway_wall": 50.0,
    "cortical_bone": 1000.0,
    "trabecular_bone": 250.0,
    "cartilage": 120.0,
    "disc": 90.0,
    "spinal_canal": 20.0,
    "oesophagus": 40.0,
    "liver": 60.0,
    "spleen": 45.0,
    "solid_nodule": 40.0,
}

_L = PHANTOM_LABELS
_BIG = np.float32(1.0e4)  # "far outside" distance (mm)
_CHUNK_VOXELS = 1 << 22  # voxels rendered per batch of slices (bounds memory; ~16 MB per float32 temporary)


@dataclass(frozen=True)
class ChestPhantomOptions:
    """Knobs of :func:`chest_phantom`; every length is in mm and every value in HU.

    ``z_center_mm`` is the anatomical level of the volume's centre slice (0 = the hila, ~25 mm below the carina;
    +60 = upper lobes and aortic arch, −80 = heart and liver dome). Nodules are placed inside the lungs *within the
    field of view* (so a thin slab still shows them); everything else is defined for the whole chest and does not
    depend on the volume's shape or spacing.
    """

    body_variation: float = 0.08  #: relative ± range of the seeded body size and shape
    z_center_mm: float = 0.0
    nodule_count: int = 3  #: nodules inside the lungs within the field of view (fewer if they do not fit)
    nodule_diameter_mm: tuple[float, float] = (3.0, 30.0)  #: diameters are log-uniform in this range
    nodule_type_weights: tuple[float, float, float] = (0.5, 0.25, 0.25)  #: solid, part-solid, ground-glass
    vessel_generations: int = 16  #: max branchings from the hilum (the trees also stop at the min radius)
    vessel_trunk_radius_mm: float = 6.0  #: at the hila and the venous roots
    vessel_min_radius_mm: float = 0.4  #: smallest vessel drawn; sets the tree size (~4·(trunk/min)³ points)
    airway_generations: int = 3  #: branchings after the lobar bronchi
    contrast: bool = False  #: enhance all blood (heart chambers, aorta, pulmonary and great vessels)
    contrast_hu: float = 250.0
    lung_hu: float = -850.0
    lung_texture_hu: float = 20.0  #: SD of the smooth parenchymal texture
    lung_gradient_hu: float = 40.0  #: anterior → posterior (dependent) density increase
    antialias: bool = True  #: partial-volume edges; False gives hard (staircase) edges

    def __post_init__(self) -> None:
        lo, hi = self.nodule_diameter_mm
        if not 0 < lo <= hi:
            raise ValueError(f"nodule_diameter_mm must satisfy 0 < low <= high, got {self.nodule_diameter_mm}")
        if self.nodule_count < 0 or self.vessel_generations < 0 or self.airway_generations < 0:
            raise ValueError("nodule_count, vessel_generations and airway_generations must be >= 0")
        w = self.nodule_type_weights
        if len(w) != 3 or min(w) < 0 or sum(w) <= 0:
            raise ValueError(f"nodule_type_weights needs 3 non-negative weights, got {w}")
        if not 0 <= self.body_variation < 0.5:
            raise ValueError(f"body_variation must be in [0, 0.5), got {self.body_variation}")
        if self.vessel_trunk_radius_mm <= 0 or self.vessel_min_radius_mm <= 0:
            raise ValueError("vessel radii must be positive")


# --- small geometry helpers ------------------------------------------------------------------------------------------


def _rng(seed: int, stream: int) -> np.random.Generator:
    """Independent seeded stream per anatomy part (changing one option does not reshuffle the others)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), stream]))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _sel(cond: np.ndarray, a: float, b: float) -> np.ndarray:
    """float32 ``a`` where ``cond`` else ``b`` (keeps the rendering in float32)."""
    return np.where(cond, np.float32(a), np.float32(b))


def _ellipse_q(x, y, a: float, b):
    """Normalised radius q of ellipse (a, b) and the ratio q/|∇q| (mm): its SDF scaled by s is (q − s)·ratio."""
    u = x / a
    v = y / b
    q = np.sqrt(u * u + v * v)
    g = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    bmin = float(np.min(b)) if np.ndim(b) else float(b)
    return q, (q + 1e-6) / (g + 1e-6 / min(a, bmin))


def _ellipse_sdf(x, y, a: float, b) -> np.ndarray:
    """Approximate SDF (mm) of the ellipse x²/a² + y²/b² = 1 (first-order, exact on the boundary)."""
    q, ratio = _ellipse_q(x, y, a, b)
    return (q - 1.0) * ratio


def _seg2d_dist(x, y, p0: tuple[float, float], p1: tuple[float, float]) -> np.ndarray:
    """In-plane distance (mm) of points to the segment p0–p1."""
    ax, ay = p1[0] - p0[0], p1[1] - p0[1]
    px, py = x - p0[0], y - p0[1]
    t = np.clip((px * ax + py * ay) / (ax * ax + ay * ay), 0.0, 1.0)
    return np.sqrt((px - t * ax) ** 2 + (py - t * ay) ** 2)


@dataclass
class _Segments:
    """Tapered capsules: centre line a → b (N, 3) in (x, y, z) mm, radius ra at a and rb at b (mm)."""

    a: np.ndarray
    b: np.ndarray
    ra: np.ndarray
    rb: np.ndarray

    @staticmethod
    def of(items: list[tuple[tuple[float, float, float], tuple[float, float, float], float, float]]) -> _Segments:
        if not items:
            return _Segments(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0))
        a, b, ra, rb = zip(*items)
        return _Segments(np.array(a, float), np.array(b, float), np.array(ra, float), np.array(rb, float))

    @staticmethod
    def cat(parts: list[_Segments]) -> _Segments:
        return _Segments(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("a", "b", "ra", "rb")))

    def __len__(self) -> int:
        return len(self.ra)

    def distance_points(self, p: np.ndarray) -> np.ndarray:
        """Distance (mm, negative inside) of points p (N, 3) to the union of the capsules."""
        out = np.full(len(p), float(_BIG))
        for a, b, ra, rb in zip(self.a, self.b, self.ra, self.rb):
            ab = b - a
            t = np.clip((p - a) @ ab / (ab @ ab), 0.0, 1.0)
            d = np.linalg.norm(p - a - t[:, None] * ab, axis=1) - (ra + t * (rb - ra))
            np.minimum(out, d, out=out)
        return out


class _Grid:
    """Voxel-centre coordinates (mm) of a batch of slices: x (nx,), y (ny,), z (nz,), all float32 and ascending."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, spacing: tuple[float, float, float], aa: bool):
        self.x, self.y, self.z = x, y, z
        self.sx, self.sy, self.sz = spacing
        self.sxy = max(self.sx, self.sy)
        self.aa = aa
        self.X = x[None, None, :]
        self.Y = y[None, :, None]
        self.Z = z[:, None, None]
        self.shape = (len(z), len(y), len(x))

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Index box (z, y, x slices) of the voxels whose centres lie in [lo, hi] ((x, y, z) mm); None if empty."""
        out = []
        for c, l, h in ((self.z, lo[2], hi[2]), (self.y, lo[1], hi[1]), (self.x, lo[0], hi[0])):
            i0, i1 = int(np.searchsorted(c, l, "left")), int(np.searchsorted(c, h, "right"))
            if i0 >= i1:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def sub(self, box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (x, y, z) coordinates of a box."""
        return self.x[box[2]][None, None, :], self.y[box[1]][None, :, None], self.z[box[0]][:, None, None]

    def cover(self, d: np.ndarray, w: np.ndarray | float | None = None) -> np.ndarray:
        """Partial-volume fraction (0…1) of voxels from an SDF d (mm) and the footprint w (mm) along its normal."""
        if not self.aa:
            return (d <= 0).astype(np.float32)
        w = self.sxy if w is None else w
        return np.clip(0.5 - d / w, 0.0, 1.0).astype(np.float32, copy=False)


def _paint(hu: np.ndarray, lab: np.ndarray, alpha: np.ndarray, value, label: int, box=None) -> None:
    """Composite ``value`` (HU, scalar or array) over ``hu`` with coverage ``alpha``; label where alpha ≥ 0.5."""
    if box is not None:
        hu, lab = hu[box], lab[box]
        if not np.isscalar(value) and np.ndim(value) == 3:
            value = value[box]
    hu += alpha * (value - hu)
    lab[np.broadcast_to(alpha >= 0.5, lab.shape)] = label


def _segment_offset(grid: _Grid, box, a_mm: np.ndarray, b_mm: np.ndarray):
    """Offset (ex, ey, ez) in mm from each voxel of ``box`` to its nearest point on the segment a→b, and
    that point's position t ∈ [0, 1] along the segment."""
    a = a_mm.tolist()
    ab = (b_mm - a_mm).tolist()
    l2 = max(ab[0] ** 2 + ab[1] ** 2 + ab[2] ** 2, 1e-9)
    X, Y, Z = grid.sub(box)
    px, py, pz = X - a[0], Y - a[1], Z - a[2]
    t = np.clip((px * (ab[0] / l2) + py * (ab[1] / l2) + pz * (ab[2] / l2)), 0.0, 1.0)
    return px - t * ab[0], py - t * ab[1], pz - t * ab[2], t


def _capsules_cover(grid: _Grid, segs: _Segments, grow: np.ndarray | float = 0.0) -> np.ndarray:
    """Union coverage (max over capsules) of tapered capsules whose radii are enlarged by ``grow`` (mm)."""
    cov = np.zeros(grid.shape, np.float32)
    if len(segs) == 0:
        return cov
    grow = np.broadcast_to(np.asarray(grow, float), segs.ra.shape)
    ra, rb = segs.ra + grow, segs.rb + grow
    r = np.maximum(ra, rb)[:, None]
    pad = grid.sxy + grid.sz
    lo = np.minimum(segs.a, segs.b) - r - pad
    hi = np.maximum(segs.a, segs.b) + r + pad
    first = np.array([grid.x[0], grid.y[0], grid.z[0]])
    last = np.array([grid.x[-1], grid.y[-1], grid.z[-1]])
    keep = np.nonzero(np.all((hi >= first) & (lo <= last), axis=1))[0]
    sx, sy, sz = grid.sx, grid.sy, grid.sz
    for i in keep:
        box = grid.box(lo[i], hi[i])
        if box is None:
            continue
        ex, ey, ez, t = _segment_offset(grid, box, segs.a[i], segs.b[i])
        rr = np.sqrt(ex * ex + ey * ey + ez * ez)
        d = rr - (float(ra[i]) + t * float(rb[i] - ra[i]))
        w = (np.abs(ex) * sx + np.abs(ey) * sy + np.abs(ez) * sz + 1e-3 * sx) / (rr + 1e-3)
        sub = cov[box]
        np.maximum(sub, grid.cover(d, w), out=sub)
    return cov


def _capsules_distance(grid: _Grid, segs: _Segments, reach: float) -> np.ndarray:
    """Distance field (mm) to the union of capsules, exact within ``reach`` mm of them and ≥ reach elsewhere."""
    out = np.full(grid.shape, _BIG, np.float32)
    for i in range(len(segs)):
        r = max(segs.ra[i], segs.rb[i]) + reach
        box = grid.box(np.minimum(segs.a[i], segs.b[i]) - r, np.maximum(segs.a[i], segs.b[i]) + r)
        if box is None:
            continue
        ex, ey, ez, t = _segment_offset(grid, box, segs.a[i], segs.b[i])
        d = np.sqrt(ex**2 + ey**2 + ez**2)
        d -= float(segs.ra[i]) + t * float(segs.rb[i] - segs.ra[i])
        sub = out[box]
        np.minimum(sub, d, out=sub)
    return out


# --- the seeded anatomy ----------------------------------------------------------------------------------------------


class _Anatomy:
    """All seeded anatomical parameters of one phantom (mm, patient LPS frame); no voxels."""

    def __init__(self, seed: int, opts: ChestPhantomOptions):
        rng = _rng(seed, 1)
        var = opts.body_variation

        def uni(lo: float, hi: float) -> float:
            return float(rng.uniform(lo, hi))

        def jitter(scale: float = 1.0) -> float:
            return 1.0 + var * scale * uni(-1.0, 1.0)

        size = jitter()
        # body outline (piecewise ellipse: anterior/posterior half-axes) and wall layers
        self.body = (160.0 * size * jitter(0.5), 110.0 * size * jitter(0.5), 120.0 * size * jitter(0.5))
        skin = 2.0
        fat_x, fat_a, fat_p = uni(8, 25), uni(5, 16), uni(5, 12)
        mus_x, mus_a, mus_p = uni(8, 14), uni(6, 12), uni(28, 36)
        wall = 8.0  # ribs and intercostal muscle
        a, ba, bp = self.body
        self.skin_in = (a - skin, ba - skin, bp - skin)
        self.fat_in = (a - skin - fat_x, ba - skin - fat_a, bp - skin - fat_p)
        self.mus_in = (self.fat_in[0] - mus_x, self.fat_in[1] - mus_a, self.fat_in[2] - mus_p)
        self.cav = (self.mus_in[0] - wall, self.mus_in[1] - wall, self.mus_in[2] - wall)
        ac, bca, bcp = self.cav
        self.z_taper = 55.0 + uni(-8, 8)  # thorax narrows towards the lung apices above this level
        self.z_apex = 150.0 + uni(-10, 10)
        # mediastinum: band between the lungs
        self.x_med = 4.0 + uni(-3, 3)
        self.w_med = 9.0 * jitter(0.5)
        # diaphragm domes (right higher); lungs lie above z_dome(x, y)
        z_right = -70.0 + uni(-10, 10)
        self.z_peak = (z_right, z_right - uni(5, 18))  # (right, left)
        self.dome_x, self.dome_y = 0.5 * ac, 5.0
        self.dome_rx, self.dome_ry, self.dome_depth, self.recess = 0.75 * ac, 0.55 * (bca + bcp), 85.0, 25.0
        # heart: rotated ellipsoid, long axis to the left, anterior
        self.heart_c = (18.0 + uni(-5, 5), -0.35 * bca + uni(-4, 4), self.z_peak[0] + 20.0)
        hs = jitter()
        self.heart_axes = (62.0 * hs, 40.0 * hs, 45.0 * hs)
        self.heart_phi = float(np.deg2rad(40.0 + uni(-8, 8)))
        # spine: vertebral body, canal, posterior elements; periodic in z
        self.vb = (0.0, bcp - 20.0, 20.0 * jitter(0.5), 16.0 * jitter(0.5))  # centre x, y, half-axes
        self.v_pitch, self.v_z0, self.v_disc = 27.0 * jitter(0.3), uni(0, 27), 6.0
        self.canal = (0.0, self.vb[1] + self.vb[3] + 9.0, 8.0)
        # ribs: bands around the cavity, sloping down anteriorly
        self.rib_pitch = 26.0 * jitter(0.3)
        self.rib_z0 = 140.0 + uni(-8, 8)  # first rib, posterior end
        self.rib_slope = 55.0 + uni(-10, 10)
        self.rib_jitter = rng.uniform(-2.5, 2.5, 12).astype(np.float32)
        self.rib_half = (4.0, 6.5)  # radial, z half-thickness
        self.rib_off = 5.5
        self.cart_x = 0.4 * ac  # costal cartilage medial to this
        # sternum
        self.sternum = (0.0, -(bca + 5.0), 16.0, 6.0, -90.0, 115.0)  # x, y, half-width, half-thickness, z range
        # airways: trachea, carina, main bronchi
        y_e = self.vb[1] - self.vb[3] - 9.0
        self.oesophagus = (8.0, y_e, 8.0)
        self.y_tr = y_e - 21.0
        self.z_car = 25.0 + uni(-5, 5)
        r_tr = 9.0 * jitter(1.0)
        car = (0.0, self.y_tr, self.z_car)
        br_r = (self.x_med - 28.0, self.y_tr + 8.0, self.z_car - 20.0)
        br_l = (self.x_med + 40.0, self.y_tr + 12.0, self.z_car - 35.0)
        self.airways_main = _Segments.of([((0.0, self.y_tr, 400.0), car, r_tr, r_tr), (car, br_r, 6.5, 6.0),
                                          (car, br_l, 6.0, 5.5)])
        # aorta: ascending, arch (bowing to the left of the trachea), descending; arch branches
        asc = (-12.0, -0.32 * bca, self.heart_c[2] + 30.0)
        z_arch = 45.0 + uni(-5, 5)
        desc = (self.vb[0] + self.vb[2] + 11.0, self.vb[1] - 5.0)
        ra = 15.0 * jitter(1.0)
        t = np.linspace(0.0, 1.0, 13)
        arch = np.stack([asc[0] + t * (desc[0] - asc[0]) + 22.0 * np.sin(np.pi * t),
                         asc[1] + t * (desc[1] - asc[1]),
                         z_arch + 30.0 * np.sin(np.pi * t)], axis=1)
        rr = ra + t * (0.8 * ra - ra)
        items = [(asc, tuple(arch[0]), ra, ra)]
        items += [(tuple(arch[i]), tuple(arch[i + 1]), rr[i], rr[i + 1]) for i in range(12)]
        items.append(((desc[0], desc[1], z_arch), (desc[0], desc[1], -400.0), 0.8 * ra, 0.8 * ra))
        for ti, top, rbr in ((0.2, (-22.0, -10.0, 400.0), 6.5), (0.4, (0.0, -8.0, 400.0), 4.5),
                             (0.6, (28.0, 5.0, 400.0), 5.0)):
            base = arch[int(round(ti * 12))]
            items.append((tuple(base), top, rbr, rbr))
        self.aorta = _Segments.of(items)
        # great vessels: SVC, pulmonary trunk and arteries, pulmonary veins (into the left atrium)
        hx, hy, hz = self.heart_c
        self.hilum = {-1: (self.x_med - 40.0, 0.0, 12.0), 1: (self.x_med + 50.0, 8.0, 20.0)}
        bif = (12.0, -22.0, 12.0)
        la = (hx - 15.0, hy + 40.0, hz + 25.0)
        self.vein_roots = {s: [(self.x_med + s * 38.0, 12.0, -10.0),
                               (self.x_med + s * 36.0, 22.0, -35.0)] for s in (-1, 1)}
        items = [((-30.0, -18.0, 400.0), (-28.0, -16.0, hz + 25.0), 10.0, 10.0),
                 ((hx - 3.0, hy - 20.0, hz + 30.0), bif, 13.0, 13.0),
                 (bif, self.hilum[-1], 10.0, 9.0),
                 (bif, (self.hilum[1][0] - 20.0, 5.0, 28.0), 10.0, 10.0),
                 ((self.hilum[1][0] - 20.0, 5.0, 28.0), self.hilum[1], 10.0, 9.0)]
        items += [(root, la, 7.0, 7.0) for s in (-1, 1) for root in self.vein_roots[s]]
        self.great = _Segments.of(items)
        self.mediastinal = _Segments.cat([self.aorta, self.great])
        self.heart_margin, self.vessel_margin, self.spine_margin = 4.0, 5.0, 6.0
        # pulmonary vessel trees (arteries from the hila, veins from the venous roots) and bronchial trees, each
        # filling its own random sample of lung points (territories)
        trng = _rng(seed, 2)
        r0 = opts.vessel_trunk_radius_mm
        n_pts = int(np.clip(4.0 * (r0 / opts.vessel_min_radius_mm) ** 3, 64, 20000))
        trees = []
        for s in (-1, 1):
            pts = self.sample_lung(trng, n_pts, s)
            trees.append(self._tree(trng, [self.hilum[s]], r0 * jitter(0.5), pts, opts.vessel_generations,
                                    opts.vessel_min_radius_mm))
            pts = self.sample_lung(trng, n_pts, s)
            trees.append(self._tree(trng, self.vein_roots[s], r0 * jitter(0.5), pts, opts.vessel_generations,
                                    opts.vessel_min_radius_mm))
        self.vessels = _Segments.cat(trees)
        arng = _rng(seed, 3)
        n_gen = opts.airway_generations + 1  # lobar bronchi are generation 1
        trees = [self.airways_main]
        for s, root, r in ((-1, br_r, 6.0), (1, br_l, 5.5)):
            pts = self.sample_lung(arng, 2 ** (n_gen + 3), s)
            trees.append(self._tree(arng, [root], r, pts, n_gen, 1.0, lam=0.45))
        self.airways = _Segments.cat(trees)

    # -- analytic fields, for any broadcastable x, y, z (mm) --

    def taper(self, z):
        """Scale of the thoracic cavity at level z: ≤ 1, narrowing upwards, a dome to the apex, < 0 above."""
        t = np.clip((z - self.z_taper) / (self.z_apex - self.z_taper), 0.0, 1.2)
        v = 1.0 - t * t
        widen = 1.0 - 0.0005 * np.clip(z + 100.0, 0.0, None)  # the thorax widens towards the diaphragm
        return np.sign(v) * np.sqrt(np.abs(v)) * widen

    def cavity_sdf(self, x, y, z):
        a, ba, bp = self.cav
        q, ratio = _ellipse_q(x, y, a, _sel(y < 0, ba, bp))
        return (q - self.taper(z)) * ratio

    def dome(self, x, y):
        """Diaphragm height z (mm), the SDF normaliser √(1 + |∇z|²) and the slopes ∂z/∂x, ∂z/∂y.

        Two domes (the right one higher) falling off quadratically to the costophrenic recesses, deeper
        posteriorly, joined by the central tendon under the heart.
        """
        right = x < self.x_med
        xc = _sel(right, -self.dome_x, self.dome_x)
        zp = _sel(right, self.z_peak[0], self.z_peak[1])
        ux, uy = (x - xc) / self.dome_rx, (y - self.dome_y) / self.dome_ry
        post = np.maximum(y, 0.0) / self.cav[2]
        z = zp - self.dome_depth * (ux * ux + uy * uy) - self.recess * post
        gx = -2.0 * self.dome_depth * ux / self.dome_rx
        gy = -2.0 * self.dome_depth * uy / self.dome_ry - _sel(y > 0, self.recess / self.cav[2], 0.0)
        # central tendon: between the domes the diaphragm stays high (under the heart)
        um = (x - self.x_med) / (0.5 * self.cav[0])
        zt = min(self.z_peak) - 15.0 - 30.0 * um * um - self.recess * post
        tendon = zt > z
        z = np.where(tendon, zt, z)
        gx = np.where(tendon, -60.0 * um / (0.5 * self.cav[0]), gx)
        gy = np.where(tendon, -_sel(y > 0, self.recess / self.cav[2], 0.0), gy)
        return z, np.sqrt(1.0 + gx * gx + gy * gy), gx, gy

    def heart_local(self, x, y, z, scale: float = 1.0):
        """Heart ellipsoid SDF (mm) and its gradient direction in (x, y, z)."""
        c, s = float(np.cos(self.heart_phi)), float(np.sin(self.heart_phi))
        dx, dy, dz = x - self.heart_c[0], y - self.heart_c[1], z - self.heart_c[2]
        A, B, C = (scale * v for v in self.heart_axes)
        u, v = c * dx - s * dy, s * dx + c * dy
        gu, gv, gw = u / (A * A), v / (B * B), dz / (C * C)
        q = np.sqrt((u / A) ** 2 + (v / B) ** 2 + (dz / C) ** 2)
        g = np.sqrt(gu * gu + gv * gv + gw * gw)
        d = (q - 1.0) * (q + 1e-6) / (g + 1e-6 / min(A, B, C))
        return d, (c * gu + s * gv, -s * gu + c * gv, gw), g

    def spine_sdf2(self, x, y):
        return _ellipse_sdf(x - self.vb[0], y - self.vb[1], self.vb[2], self.vb[3])

    def lung_sdf(self, x, y, z, d_heart, d_med, d_cav=None):
        """SDF (mm) of both lungs: cavity minus mediastinum, heart, great vessels and spine, above the domes."""
        d = self.cavity_sdf(x, y, z) if d_cav is None else d_cav
        w = self.w_med * np.clip(1.0 + 0.6 * (y + 30.0) / (self.cav[1] - 30.0), 0.4, 1.0)  # narrower anteriorly
        d = np.maximum(d, w - np.abs(x - self.x_med))
        zd, nrm, _, _ = self.dome(x, y)
        d = np.maximum(d, (zd - z) / nrm)
        d = np.maximum(d, self.heart_margin - d_heart)
        d = np.maximum(d, self.vessel_margin - d_med)
        return np.maximum(d, self.spine_margin - self.spine_sdf2(x, y))

    def lung_sdf_points(self, p: np.ndarray) -> np.ndarray:
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        return self.lung_sdf(x, y, z, self.heart_local(x, y, z)[0], self.mediastinal.distance_points(p))

    def sample_lung(self, rng: np.random.Generator, n: int, side: int) -> np.ndarray:
        """``n`` points (n, 3) uniformly distributed inside one lung (side −1 right, +1 left), mm."""
        ac, bca, bcp = self.cav
        lo = np.array([self.x_med if side > 0 else -ac, -bca, min(self.z_peak) - self.dome_depth - self.recess])
        hi = np.array([ac if side > 0 else self.x_med, bcp, self.z_apex])
        out, have = [], 0
        while have < n:
            cand = lo + rng.uniform(0.0, 1.0, (3 * n, 3)) * (hi - lo)
            cand = cand[self.lung_sdf_points(cand) < -1.0]
            out.append(cand)
            have += len(cand)
        return np.concatenate(out)[:n]

    def _tree(self, rng: np.random.Generator, roots: list, r_root: float, pts: np.ndarray, max_gen: int,
              min_r: float, lam: float = 0.5, taper: float = 0.92) -> _Segments:
        """A space-filling branching tree from ``roots`` that supplies the points ``pts`` (its territory).

        Every branch supplies a set of points: it runs from its start towards their centroid (a fraction ``lam``
        of the way; all the way for the last few points), then its territory is cut in two by a plane across its
        (randomly tilted) principal axis at a random offset, and each half becomes a child branch. The radius
        follows Murray's law with flow ∝ territory size, r = r_root·(n/N)^(1/3), so r³ = r₁³ + r₂³ at every
        branching. A branch ends when its territory has ≤ 2 points, its radius falls below ``min_r`` (mm) or
        after ``max_gen`` branchings. Vectorised over the branch front of each generation.
        """
        roots = np.asarray(roots, float)
        n_total = len(pts)
        owner = np.argmin(((pts[:, None, :] - roots[None]) ** 2).sum(-1), axis=1)  # nearest root
        start = roots
        out = []
        for g in range(max_gen + 1):
            m = len(start)
            if m == 0 or len(pts) == 0:
                break
            cnt = np.bincount(owner, minlength=m).astype(float)
            norm = np.maximum(cnt, 1.0)
            cen = np.stack([np.bincount(owner, pts[:, k], minlength=m) for k in range(3)], 1) / norm[:, None]
            r = r_root * (cnt / n_total) ** (1 / 3)
            last = (cnt <= 2) | (r * 0.79 < min_r) | (g == max_gen)
            end = start + np.where(cnt <= 2, 1.0, lam)[:, None] * (cen - start)
            bad = np.nonzero(self.lung_sdf_points(end) > -0.5 * r)[0]
            for b in bad:  # a concave lung: end at the territory point nearest to the planned end instead
                mine = pts[owner == b]
                end[b] = mine[np.argmin(((mine - end[b]) ** 2).sum(1))]
            live = cnt > 0
            out.append(_Segments(start[live], end[live], r[live], taper * r[live]))
            # split each territory across its (tilted) principal axis
            dev = pts - cen[owner]
            cov = np.empty((m, 3, 3))
            for i in range(3):
                for j in range(i, 3):
                    cov[:, i, j] = cov[:, j, i] = np.bincount(owner, dev[:, i] * dev[:, j], minlength=m) / norm
            evals, evecs = np.linalg.eigh(cov + 1e-6 * np.eye(3))
            axis = _unit(evecs[:, :, 2] + 0.4 * _unit(rng.normal(size=(m, 3))))
            cut = rng.normal(0.0, 0.2, m) * np.sqrt(np.maximum(evals[:, 2], 0.0))
            side = ((dev * axis[owner]).sum(1) > cut[owner]).astype(np.intp)
            keep = ~last[owner]
            pts, owner, side = pts[keep], owner[keep], side[keep]
            child = owner * 2 + side
            ids, owner = np.unique(child, return_inverse=True)
            start = end[ids // 2]
        return _Segments.cat(out) if out else _Segments.of([])


# --- nodules and texture ---------------------------------------------------------------------------------------------


@dataclass
class _Nodule:
    centre: np.ndarray  # (3,) mm
    radius: float  # mm
    hu: float
    lobes: np.ndarray  # (k, 3) unit vectors
    amps: np.ndarray  # (k,) relative radius modulation
    orders: np.ndarray  # (k,) Legendre order 2..4
    blur: float  # extra edge width (mm): ground glass is ill-defined
    core: _Nodule | None = None  # solid component of a part-solid nodule


def _legendre(n: int, t: np.ndarray) -> np.ndarray:
    """Legendre polynomial P_n(t) for n = 2, 3 or 4."""
    if n == 2:
        return 0.5 * (3 * t * t - 1)
    if n == 3:
        return 0.5 * (5 * t**3 - 3 * t)
    return (35 * t**4 - 30 * t * t + 3) / 8


def _place_nodules(rng: np.random.Generator, anat: _Anatomy, opts: ChestPhantomOptions, lo: np.ndarray,
                   hi: np.ndarray) -> list[_Nodule]:
    """Nodules fully inside the lungs with centres in the box [lo, hi] ((x, y, z) mm), not overlapping."""
    w = np.asarray(opts.nodule_type_weights, float)
    out: list[_Nodule] = []
    dlo, dhi = opts.nodule_diameter_mm
    for _ in range(opts.nodule_count):
        kind = int(rng.choice(3, p=w / w.sum()))
        diam = float(np.exp(rng.uniform(np.log(dlo), np.log(dhi))))
        cand = lo + rng.uniform(0, 1, (2048, 3)) * (hi - lo)
        sd = anat.lung_sdf_points(cand)
        lobes, amps = _unit(rng.normal(size=(4, 3))), rng.uniform(-1, 1, 4)
        orders = rng.integers(2, 5, 4)
        hu_solid = TISSUE_HU["solid_nodule"] + float(rng.uniform(-15, 15))
        hu_gg = float(rng.uniform(-600, -300))
        core_frac, core_dir = float(rng.uniform(0.3, 0.6)), _unit(rng.normal(size=3))
        placed = None
        while diam >= dlo * 0.999 and placed is None:
            r = diam / 2
            ok = sd < -(1.2 * r + 1.0)
            for n in out:
                ok &= np.linalg.norm(cand - n.centre, axis=1) > 1.2 * (r + n.radius) + 2.0
            if ok.any():
                placed = cand[int(np.argmax(ok))]
            else:
                diam *= 0.7
        if placed is None:
            continue
        r = diam / 2
        if kind == 0:
            out.append(_Nodule(placed, r, hu_solid, lobes, 0.06 * amps, orders, 0.0))
        elif kind == 1:
            rc = core_frac * r
            core = _Nodule(placed + 0.4 * (r - rc) * core_dir, rc, hu_solid, lobes, 0.05 * amps, orders, 0.0)
            out.append(_Nodule(placed, r, min(hu_gg, -400.0), lobes, 0.04 * amps, orders, 1.0, core))
        else:
            out.append(_Nodule(placed, r, hu_gg, lobes, 0.04 * amps, orders, 1.5))
    return out


def _paint_nodule(grid: _Grid, hu: np.ndarray, lab: np.ndarray, n: _Nodule) -> None:
    reach = n.radius * (1 + np.abs(n.amps).sum()) + n.blur + grid.sxy + grid.sz
    box = grid.box(n.centre - reach, n.centre + reach)
    if box is not None:
        X, Y, Z = grid.sub(box)
        c = n.centre.tolist()
        dx, dy, dz = X - c[0], Y - c[1], Z - c[2]
        rr = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
        nx, ny, nz = dx / rr, dy / rr, dz / rr
        rad = np.full(rr.shape, 1.0, np.float32)
        for v, amp, order in zip(n.lobes.tolist(), n.amps.tolist(), n.orders.tolist()):
            rad += amp * _legendre(order, nx * v[0] + ny * v[1] + nz * v[2])
        d = rr - n.radius * rad
        w = np.abs(nx) * grid.sx + np.abs(ny) * grid.sy + np.abs(nz) * grid.sz + n.blur
        _paint(hu, lab, grid.cover(d, w), n.hu, _L["nodule"], box)
    if n.core is not None:
        _paint_nodule(grid, hu, lab, n.core)


class _Texture:
    """Smooth, seeded lung texture: white noise on a fixed 4 mm lattice convolved with a Gaussian (σ = 5 mm).

    The lattice is fixed in patient space, so the texture does not depend on the volume's shape or spacing; it is
    evaluated separably (three small matrix products) and has unit SD inside the lattice box.
    """

    step, sigma = 4.0, 5.0
    box = ((-220.0, 220.0), (-220.0, 220.0), (-420.0, 420.0))  # x, y, z (mm)

    def __init__(self, seed: int):
        self.nodes = [np.arange(lo, hi + 1e-6, self.step) for lo, hi in self.box]
        rng = _rng(seed, 4)
        self.noise = rng.standard_normal((len(self.nodes[2]), len(self.nodes[1]), len(self.nodes[0])), np.float32)
        self.norm = float((np.sqrt(np.pi) * self.sigma / self.step) ** -1.5)

    def weights(self, coords: np.ndarray, axis: int) -> tuple[np.ndarray, slice]:
        nodes = self.nodes[axis]
        i0 = max(int(np.searchsorted(nodes, coords[0] - 4 * self.sigma)), 0)
        i1 = min(int(np.searchsorted(nodes, coords[-1] + 4 * self.sigma)) + 1, len(nodes))
        i1 = max(i1, i0 + 1)
        w = np.exp(-0.5 * ((coords[:, None] - nodes[None, i0:i1]) / self.sigma) ** 2).astype(np.float32)
        return w, slice(i0, i1)

    def __call__(self, grid: _Grid) -> np.ndarray:
        wz, sz = self.weights(grid.z.astype(float), 2)
        wy, sy = self.weights(grid.y.astype(float), 1)
        wx, sx = self.weights(grid.x.astype(float), 0)
        g = self.noise[sz, sy, sx]
        t = (wz @ g.reshape(g.shape[0], -1)).reshape(len(grid.z), g.shape[1], g.shape[2])
        t = t @ wx.T  # (nz, ny', nx)
        t = np.matmul(wy[None], t)  # (nz, ny, nx)
        return t * np.float32(self.norm)


# --- rendering -------------------------------------------------------------------------------------------------------


def _render(anat: _Anatomy, opts: ChestPhantomOptions, nodules: list[_Nodule], texture: _Texture, grid: _Grid,
            hu: np.ndarray, lab: np.ndarray) -> None:
    """Composite all structures, back to front, into one batch of slices ``hu``/``lab`` (z, y, x)."""
    X, Y, Z = grid.X, grid.Y, grid.Z
    T = TISSUE_HU
    blood = opts.contrast_hu if opts.contrast else T["blood"]
    hu.fill(T["air"])
    lab.fill(_L["air"])
    # body wall: skin, subcutaneous fat, muscle (z-invariant)
    ypos = Y < 0
    for (a, ba, bp), val, label in ((anat.body, T["skin"], _L["soft_tissue"]), (anat.skin_in, T["fat"], _L["fat"]),
                                    (anat.fat_in, T["muscle"], _L["soft_tissue"])):
        _paint(hu, lab, grid.cover(_ellipse_sdf(X, Y, a, _sel(ypos, ba, bp))), val, label)
    # ribs: elliptic cross-sections (radial × z) on a ring outside the cavity; their level drops anteriorly
    d_cav = anat.cavity_sdf(X, Y, Z)
    ac, bca, bcp = anat.cav
    phi = np.arctan2(np.abs(X) / ac, Y / _sel(ypos, bca, bcp))  # 0 posterior … π anterior
    u = (Z - anat.rib_z0 + anat.rib_slope * 0.5 * (1.0 - np.cos(phi))) / -anat.rib_pitch
    k = np.rint(u)
    ki = np.clip(k, 0, len(anat.rib_jitter) - 1).astype(np.intp)
    dz = (k - u) * anat.rib_pitch - anat.rib_jitter[ki]
    dr = d_cav - anat.rib_off
    tr, tz = anat.rib_half
    q = np.sqrt((dr / tr) ** 2 + (dz / tz) ** 2)
    gr, gz = dr / (tr * tr), dz / (tz * tz)
    g = np.sqrt(gr * gr + gz * gz)
    d_rib = (q - 1.0) * (q + 1e-6) / (g + 1e-6 / tr)
    d_rib = np.where((k >= 0) & (k < len(anat.rib_jitter)), d_rib, _BIG)
    d_rib = np.maximum(d_rib, _sel(ypos, anat.sternum[2] - 2.0, 28.0) - np.abs(X))  # stop at sternum and spine
    w_rib = (np.abs(gr) * grid.sxy + np.abs(gz) * grid.sz + 1e-4) / (g + 1e-4 / grid.sxy)
    _paint(hu, lab, grid.cover(d_rib, w_rib), T["cartilage"], _L["cartilage"])
    d_bone = np.maximum(d_rib, np.where(ypos, anat.cart_x - np.abs(X), -_BIG))
    _paint(hu, lab, grid.cover(d_bone, w_rib), T["cortical_bone"], _L["bone"])
    _paint(hu, lab, grid.cover(d_bone + 1.5, w_rib), T["trabecular_bone"], _L["bone"])
    del d_rib, d_bone, w_rib, u, k, ki, dz, dr, q, gr, gz, g
    # sternum (cortical shell + marrow) over its z range
    sx0, sy0, sw, st, sz0, sz1 = anat.sternum
    d_st = np.maximum(_ellipse_sdf(X - sx0, Y - sy0, sw, st), np.maximum(sz0 - Z, Z - sz1))
    _paint(hu, lab, grid.cover(d_st), T["cortical_bone"], _L["bone"])
    _paint(hu, lab, grid.cover(d_st + 1.5), T["trabecular_bone"], _L["bone"])
    # thoracic cavity filled with (mediastinal) fat; abdomen below the diaphragm: liver (right), spleen/stomach (left)
    _paint(hu, lab, grid.cover(d_cav), T["fat"], _L["fat"])
    zd, nrm, gx, gy = anat.dome(X, Y)
    d_abd = np.maximum(d_cav, (Z - zd) / nrm)
    w_dia = (np.abs(gx) * grid.sx + np.abs(gy) * grid.sy + grid.sz) / nrm
    alpha = grid.cover(d_abd, w_dia)
    liver = (X < anat.x_med)[0]
    _paint(hu, lab, alpha * liver, T["liver"], _L["liver"])
    _paint(hu, lab, alpha * ~liver, T["spleen"], _L["soft_tissue"])
    del d_abd, alpha
    # lungs: smooth texture plus a gravity-dependent gradient, above the domes, outside the mediastinum
    heart_reach = max(anat.heart_axes) + anat.heart_margin + 2 * (grid.sxy + grid.sz)
    hc = np.asarray(anat.heart_c)
    hbox = grid.box(hc - heart_reach, hc + heart_reach)
    d_heart = np.full(grid.shape, _BIG, np.float32)
    if hbox is not None:
        d_heart[hbox] = anat.heart_local(*grid.sub(hbox))[0]
    d_med = _capsules_distance(grid, anat.mediastinal, anat.vessel_margin + 2 * (grid.sxy + grid.sz))
    d_lung = anat.lung_sdf(X, Y, Z, d_heart, d_med, d_cav)
    dd = (zd - Z) / nrm
    w_lung = np.where(dd >= d_lung - 1e-3, w_dia, np.float32(grid.sxy))
    del d_med, dd, d_cav
    lung_val = (opts.lung_hu + opts.lung_gradient_hu * Y / (bca + bcp)) + opts.lung_texture_hu * texture(grid)
    _paint(hu, lab, grid.cover(d_lung, w_lung), lung_val, _L["lung"])
    del d_lung, w_lung, lung_val
    # heart: myocardium and blood pool
    if hbox is not None:
        Xb, Yb, Zb = grid.sub(hbox)
        for scale, val in ((1.0, T["myocardium_contrast"] if opts.contrast else T["myocardium"]), (0.8, blood)):
            d, (gx3, gy3, gz3), g3 = anat.heart_local(Xb, Yb, Zb, scale)
            w = (np.abs(gx3) * grid.sx + np.abs(gy3) * grid.sy + np.abs(gz3) * grid.sz + 1e-6) / (g3 + 1e-6)
            _paint(hu, lab, grid.cover(d, w), val, _L["heart"], hbox)
    # great vessels, aorta, oesophagus
    _paint(hu, lab, _capsules_cover(grid, anat.great), blood, _L["great_vessel"])
    _paint(hu, lab, _capsules_cover(grid, anat.aorta), blood, _L["aorta"])
    ex, ey, er = anat.oesophagus
    d_oe = np.maximum(np.sqrt((X - ex) ** 2 + (Y - ey) ** 2) - er, np.maximum(-150.0 - Z, Z - 400.0))
    _paint(hu, lab, grid.cover(d_oe), T["oesophagus"], _L["soft_tissue"])
    # pulmonary vessels, airways (wall, then lumen), nodules
    _paint(hu, lab, _capsules_cover(grid, anat.vessels), blood, _L["vessel"])
    wall = 0.18 * np.maximum(anat.airways.ra, anat.airways.rb) + 0.4
    _paint(hu, lab, _capsules_cover(grid, anat.airways, wall), T["airway_wall"], _L["airway_wall"])
    _paint(hu, lab, _capsules_cover(grid, anat.airways), T["air"], _L["airway"])
    for n in nodules:
        _paint_nodule(grid, hu, lab, n)
    # spine: discs, vertebral bodies (cortical shell, trabecular core), neural arch and processes, spinal canal
    vx, vy, vrx, vry = anat.vb
    d_vb = _ellipse_sdf(X - vx, Y - vy, vrx, vry)
    zz = (Z - anat.v_z0) / anat.v_pitch
    dzv = np.abs(zz - np.rint(zz)) * anat.v_pitch  # distance (mm) to the nearest vertebra's mid-level
    _paint(hu, lab, grid.cover(d_vb), T["disc"], _L["soft_tissue"])
    d_body = np.maximum(d_vb, dzv - (anat.v_pitch - anat.v_disc) / 2)
    _paint(hu, lab, grid.cover(d_body), T["cortical_bone"], _L["bone"])
    _paint(hu, lab, grid.cover(d_body + 2.0), T["trabecular_bone"], _L["bone"])
    cx, cy, cr = anat.canal
    d_arch = np.sqrt((X - cx) ** 2 + (Y - cy) ** 2) - (cr + 6.0)
    d_arch = np.minimum(d_arch, _seg2d_dist(X, Y, (cx, cy), (cx, cy + 36.0)) - 5.0)
    for s in (-1, 1):
        d_arch = np.minimum(d_arch, _seg2d_dist(X, Y, (cx, cy - 2.0), (cx + s * 34.0, cy - 6.0)) - 5.0)
    d_arch = np.maximum(d_arch, dzv - 0.35 * anat.v_pitch)
    _paint(hu, lab, grid.cover(d_arch), T["cortical_bone"], _L["bone"])
    _paint(hu, lab, grid.cover(d_arch + 2.0), T["trabecular_bone"], _L["bone"])
    d_canal = np.sqrt((X - cx) ** 2 + (Y - cy) ** 2) - cr
    _paint(hu, lab, grid.cover(d_canal), T["spinal_canal"], _L["soft_tissue"])


@lru_cache(maxsize=4)
def _anatomy(seed: int, opts: ChestPhantomOptions) -> _Anatomy:
    """The seeded anatomy (cached: it does not depend on the volume's shape or spacing)."""
    return _Anatomy(seed, opts)


def _resolve(shape, spacing_mm) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    if len(shape) != 3 or any(int(n) != n or n < 1 for n in shape):
        raise ValueError(f"shape must be 3 positive integers (z, y, x), got {shape}")
    nz, ny, nx = (int(n) for n in shape)
    if spacing_mm is None:
        s = 360.0 / max(nx, ny)
        spacing_mm = (s, s, 1.25)
    if len(spacing_mm) != 3 or any(not np.isfinite(s) or s <= 0 for s in spacing_mm):
        raise ValueError(f"spacing_mm must be 3 positive numbers (x, y, z) in mm, got {spacing_mm}")
    return (nz, ny, nx), tuple(float(s) for s in spacing_mm)


def chest_phantom(
    shape: tuple[int, int, int] = (32, 512, 512),
    spacing_mm: tuple[float, float, float] | None = (0.7, 0.7, 1.25),
    seed: int = 0,
    options: ChestPhantomOptions | None = None,
    *,
    return_labels: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """A procedural, noise-free digital chest CT: float32 HU shaped (z, y, x), optionally with uint8 labels.

    The anatomy (see docs/PHANTOM.md) is defined in mm in the patient frame and sampled at the voxel centres
    ``(i − (n − 1)/2) · spacing`` (x, y) and ``z_center_mm + (k − (nz − 1)/2) · sz`` (z), so it scales
    correctly with ``spacing_mm = (sx, sy, sz)`` (mm; None → 360 mm in-plane field of view, 1.25 mm slices); axes run
    to the patient's left (x), posterior (y) and superior (z). The same ``seed`` gives a bit-identical volume;
    another seed gives another body size and shape, vessel and airway trees, ribs, heart and nodules. Edges carry
    partial-volume values (unless ``options.antialias`` is False); no noise is added; values lie in [−1024, 3071].
    ``labels`` holds the :data:`PHANTOM_LABELS` id of the dominant tissue of each voxel.
    """
    (nz, ny, nx), spacing = _resolve(shape, spacing_mm)
    opts = options or ChestPhantomOptions()
    anat = _anatomy(int(seed), ChestPhantomOptions(  # only the options that shape the anatomy key the cache
        body_variation=opts.body_variation, vessel_generations=opts.vessel_generations,
        vessel_trunk_radius_mm=opts.vessel_trunk_radius_mm, vessel_min_radius_mm=opts.vessel_min_radius_mm,
        airway_generations=opts.airway_generations))
    x = ((np.arange(nx) - (nx - 1) / 2) * spacing[0]).astype(np.float32)
    y = ((np.arange(ny) - (ny - 1) / 2) * spacing[1]).astype(np.float32)
    z = (opts.z_center_mm + (np.arange(nz) - (nz - 1) / 2) * spacing[2]).astype(np.float32)
    lo = np.array([x[0], y[0], z[0]], float)
    hi = np.array([x[-1], y[-1], z[-1]], float)
    nodules = _place_nodules(_rng(seed, 5), anat, opts, lo, hi)
    texture = _Texture(seed)
    hu = np.empty((nz, ny, nx), np.float32)
    lab = np.empty((nz, ny, nx), np.uint8)
    step = max(1, _CHUNK_VOXELS // (ny * nx))
    for z0 in range(0, nz, step):
        z1 = min(nz, z0 + step)
        grid = _Grid(x, y, z[z0:z1], spacing, opts.antialias)
        _render(anat, opts, nodules, texture, grid, hu[z0:z1], lab[z0:z1])
    np.clip(hu, -1024.0, 3071.0, out=hu)
    return (hu, lab) if return_labels else hu


def chest_phantom_volume(
    shape: tuple[int, int, int] = (32, 256, 256),
    spacing_mm: tuple[float, float, float] | None = None,
    seed: int = 0,
    options: ChestPhantomOptions | None = None,
) -> CTVolume:
    """:func:`chest_phantom` as a :class:`CTVolume` with its geometry.

    ``spacing_mm`` (x, y, z) defaults to a 360 mm in-plane field of view and 1.25 mm slices (256² → 1.41 mm,
    512² → 0.70 mm pixels). The origin (mm, LPS, centre of the first voxel) puts the volume's centre at
    (0, 0, ``options.z_center_mm``), i.e. centred for the default options; the direction is the identity.
    """
    (nz, ny, nx), spacing = _resolve(shape, spacing_mm)
    opts = options or ChestPhantomOptions()
    hu = chest_phantom((nz, ny, nx), spacing, seed, opts)
    origin = (-(nx - 1) / 2 * spacing[0], -(ny - 1) / 2 * spacing[1], opts.z_center_mm - (nz - 1) / 2 * spacing[2])
    return CTVolume(hu=hu, spacing=spacing, origin=origin, direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
                    source=f"chest phantom seed {seed}")
