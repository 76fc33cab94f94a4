"""Random Galaxy-Zoo-like galaxies: the light components of one galaxy, its field and its ground truth.

Units: positions and radii in arcsec, fluxes in r-band nanomaggies, colours in AB magnitudes.
Angles are degrees counter-clockwise from the image's +x axis (right), with y pointing up
as the image is displayed. Sizes follow the Galaxy Zoo 2 framing: a GZ2 cutout is 424 px at
0.02 * petroR90_r arcsec per pixel, so each galaxy fills a similar fraction of its frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from galaxygen.splits import DEFAULT_FRACTIONS, split_of

GENERATOR_VERSION = 1
CLASSES = ("elliptical", "spiral", "barred_spiral", "edge_on", "irregular")
CLASS_PROBS = (0.35, 0.35, 0.12, 0.10, 0.08)
GZ2_FRAME_PX = 424
GZ2_CROP_PX = 207
GZ2_SCALE_PER_R90 = 0.02
CACHE_REF_PX = 64
SDSS_PIXEL = 0.396
SKY_SIGMA = (0.045, 0.05, 0.075)
MAG_RANGE = (12.5, 17.0)
MAX_SEED = 2**32
BAR_N = 0.4


@dataclass
class Spiral:
    """Logarithmic spiral arms (or a tidal tail) modulating a disk in its face-on plane."""

    m: int
    pitch: float
    phase: float
    contrast: float
    sharpness: float
    r_in: float
    gr: float
    ri: float
    wobble: float = 0.0
    wobble_phase: float = 0.0
    lopsided: float = 0.0


@dataclass
class Dust:
    """A dust lane along the major axis of an edge-on disk."""

    tau: float
    width: float
    offset: float
    length: float


@dataclass
class Component:
    """One light component: kind is sersic, disk, edge, bar, knots or point."""

    kind: str
    flux: float
    gr: float
    ri: float
    hlr: float = 0.0
    n: float = 1.0
    q: float = 1.0
    pa: float = 0.0
    x: float = 0.0
    y: float = 0.0
    incl: float = 0.0
    h_over_r: float = 0.1
    bar_q: float = 0.3
    bar_angle: float = 0.0
    npoints: int = 0
    seed: int = 0
    spiral: Spiral | None = None
    grid: bool = False
    clumps: list[Component] = field(default_factory=list)


@dataclass
class Galaxy:
    """A synthetic galaxy with its field (neighbours, stars), observing conditions and truth."""

    index: int
    id: str
    cls: str
    r90: float
    psf_fwhm: float
    psf_beta: float
    sky: tuple[float, float, float]
    main: list[Component]
    field: list[Component]
    dust: Dust | None
    noise_seed: int
    truth: dict

    @property
    def frame_scale(self) -> float:
        """Arcsec per pixel of the 424 px Galaxy Zoo 2 frame."""
        return GZ2_SCALE_PER_R90 * self.r90


def galaxy_id(index: int) -> str:
    """The catalog id of galaxy number `index`."""
    return f"synth-{index:06d}"


def colour_ri(gr: float, rng: np.random.Generator) -> float:
    """An r-i colour that goes with g-r along the galaxy colour sequence."""
    return float(0.06 + 0.42 * gr + rng.normal(0, 0.02))


def axis_ratio(cos_i: float, q0: float = 0.12) -> float:
    """Apparent axis ratio of a disk of intrinsic thickness q0 seen at inclination arccos(cos_i)."""
    return math.sqrt(cos_i**2 * (1 - q0**2) + q0**2)


def quantise_n(n: float) -> float:
    """Round a Sersic index to steps of 0.5 so GalSim's per-index tables are reused."""
    return float(np.clip(round(n * 2) / 2, 0.5, 6.0))


def profile_curves(parts: list[tuple[float, float, float]], r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Enclosed light and surface brightness at radii r of concentric (fraction, n, hlr) Sersic parts."""
    # imported here: training imports this module (GENERATOR_VERSION) but never renders
    from scipy.special import gamma, gammainc, gammaincinv

    light = np.zeros_like(r)
    sb = np.zeros_like(r)
    for frac, n, hlr in parts:
        b = gammaincinv(2 * n, 0.5)
        x = b * (r / hlr) ** (1 / n)
        light += frac * gammainc(2 * n, x)
        sb += frac * b ** (2 * n) / (2 * math.pi * n * gamma(2 * n) * hlr**2) * np.exp(-x)
    return light, sb


def radii(parts: list[tuple[float, float, float]]) -> tuple[float, float]:
    """True half-light radius and SDSS-like Petrosian R90 of concentric Sersic parts."""
    hlrs = [p[2] for p in parts]
    r = np.geomspace(1e-2 * min(hlrs), 40 * max(hlrs), 400)
    light, sb = profile_curves(parts, r)
    total = sum(p[0] for p in parts)
    eta = sb * math.pi * r**2 / np.maximum(light, 1e-30)
    below = np.flatnonzero((eta < 0.2) & (r > 0.05 * min(hlrs)))
    r_p = r[below[0]] if len(below) else r[-1] / 2
    flux_p = float(np.interp(2 * r_p, r, light))
    r90 = float(np.interp(0.9 * flux_p, light, r))
    r50 = float(np.interp(0.5 * total, light, r))
    return r50, r90


def band_fluxes(parts: list[Component]) -> tuple[float, float]:
    """Total g and r fluxes of components."""
    r = sum(c.flux for c in parts)
    g = sum(c.flux * 10 ** (-0.4 * c.gr) for c in parts)
    for c in parts:
        if c.spiral is not None and c.kind == "disk":
            arm = c.flux * c.spiral.contrast
            g += arm * (10 ** (-0.4 * c.spiral.gr) - 10 ** (-0.4 * c.gr))
    return g, r


def sample_mag(rng: np.random.Generator) -> float:
    """An r magnitude from number counts rising towards the GZ2 limit r = 17."""
    lo, hi = MAG_RANGE
    k = 1.1
    u = rng.random()
    return float(hi + math.log(u * (1 - math.exp(-k * (hi - lo))) + math.exp(-k * (hi - lo))) / k)


def sample_spiral(rng: np.random.Generator, r_in: float, disk_gr: float, barred: bool, phase: float) -> Spiral:
    """Arms: number, pitch, contrast and colour, GZ2-like (mostly two arms)."""
    m = int(rng.choice([1, 2, 3, 4, 5], p=[0.03, 0.62, 0.17, 0.10, 0.08]))
    gr = disk_gr - rng.uniform(0.15, 0.3)
    return Spiral(
        m=m,
        pitch=float(rng.uniform(11, 30)),
        phase=phase,
        contrast=float(rng.uniform(0.7 if barred else 0.55, 0.92) if m <= 4 else rng.uniform(0.4, 0.65)),
        sharpness=float(rng.uniform(2.0, 5.0) * (1.0 if m <= 2 else 1.5)),
        r_in=r_in,
        gr=gr,
        ri=colour_ri(gr, rng),
        wobble=float(rng.uniform(0.0, 0.5)),
        wobble_phase=float(rng.uniform(0, 2 * math.pi)),
        lopsided=float(rng.uniform(0.0, 0.35 if not barred else 0.15)),
    )


def seed_of(rng: np.random.Generator) -> int:
    """A positive integer seed for GalSim or a child numpy generator."""
    return int(rng.integers(1, MAX_SEED))


def sample_elliptical(rng: np.random.Generator, flux: float, r90: float) -> tuple[list[Component], dict]:
    """A smooth red Sersic spheroid, sometimes with a faint red disk (S0-like)."""
    n = quantise_n(rng.normal(4.0, 0.7))
    q = float(0.42 + 0.58 * rng.beta(2.5, 1.5))
    pa = float(rng.uniform(0, 180))
    gr = float(rng.normal(0.78, 0.035))
    disk_frac = float(rng.uniform(0.1, 0.3)) if rng.random() < 0.3 else 0.0
    rho = float(rng.uniform(1.5, 2.5))
    parts = [(1 - disk_frac, n, 1.0)] + ([(disk_frac, 1.0, rho)] if disk_frac else [])
    hlr, r90_unit = radii(parts)
    s = r90 / r90_unit
    comps = [Component("sersic", flux * (1 - disk_frac), gr, colour_ri(gr, rng), hlr=s, n=n, q=q, pa=pa)]
    if disk_frac:
        dq = float(min(q, rng.uniform(0.3, 1.0)))
        dgr = gr - float(rng.uniform(0.02, 0.08))
        comps.append(Component("disk", flux * disk_frac, dgr, colour_ri(dgr, rng), hlr=rho * s, q=dq, pa=pa))
    truth = dict(bulge_frac=1 - disk_frac, hlr_arcsec=hlr * s, ellipticity=1 - q, position_angle=pa,
                 sersic_n=n, n_arms=0, has_bar=False, axis_ratio=q, inclination_deg=np.nan, pitch_deg=np.nan)
    return comps, truth


def sample_disk_galaxy(rng: np.random.Generator, flux: float, r90: float, barred: bool) -> tuple[list[Component], dict]:
    """Bulge + exponential disk with spiral arms, star-forming knots and (if barred) a bar."""
    bulge_frac = 0.0 if rng.random() < 0.12 else float(np.clip(rng.beta(1.6, 7.0 if barred else 5.0), 0.03, 0.7))
    n_b = quantise_n(rng.uniform(1.5, 4.0))
    cos_i = float(rng.uniform(0.5, 1.0) if barred else rng.uniform(0.25, 1.0))
    q = axis_ratio(cos_i)
    pa = float(rng.uniform(0, 180))
    rho = float(rng.uniform(0.12, 0.35))
    bar_frac = float(rng.uniform(0.18, 0.32)) if barred else 0.0
    bar_len = float(rng.uniform(0.85, 1.25))
    knot_frac = float(rng.uniform(0.04, 0.14))
    disk_frac = 1 - bulge_frac - bar_frac
    parts = [(disk_frac, 1.0, 1.0)]
    if bulge_frac:
        parts.append((bulge_frac, n_b, rho))
    if bar_frac:
        parts.append((bar_frac, BAR_N, bar_len))
    hlr, r90_unit = radii(parts)
    s = r90 / r90_unit
    h_d = s
    disk_gr = float(np.clip(rng.normal(0.5, 0.07), 0.3, 0.7))
    bulge_gr = float(np.clip(rng.normal(0.74, 0.04), 0.6, 0.85))
    bar_angle = float(rng.uniform(0, 180))
    r_in = bar_len * h_d * 1.3 if barred else float(rng.uniform(0.25, 0.5)) * h_d
    spiral = sample_spiral(rng, r_in, disk_gr, barred, phase=bar_angle if barred else float(rng.uniform(0, 360)))
    knot_gr = float(rng.normal(0.2, 0.07))
    comps = [
        Component("disk", flux * disk_frac * (1 - knot_frac), disk_gr, colour_ri(disk_gr, rng), hlr=h_d, q=q, pa=pa,
                  spiral=spiral),
        Component("knots", flux * disk_frac * knot_frac, knot_gr, colour_ri(knot_gr, rng), hlr=h_d * 1.1, q=q,
                  pa=pa, npoints=int(rng.integers(20, 70)), seed=seed_of(rng), spiral=spiral),
    ]
    bq = float(max(q, rng.uniform(0.7, 1.0)))
    if bulge_frac:
        comps.append(Component("sersic", flux * bulge_frac, bulge_gr, colour_ri(bulge_gr, rng), hlr=rho * h_d,
                               n=n_b, q=bq, pa=pa))
    if barred:
        bar_gr = bulge_gr - 0.04
        comps.append(Component("bar", flux * bar_frac, bar_gr, colour_ri(bar_gr, rng), hlr=bar_len * h_d, n=BAR_N,
                               q=q, pa=pa, bar_q=float(rng.uniform(0.18, 0.3)), bar_angle=bar_angle))
    main_q = q if disk_frac >= bulge_frac else bq
    truth = dict(bulge_frac=bulge_frac, hlr_arcsec=hlr * s, ellipticity=1 - main_q, position_angle=pa,
                 sersic_n=n_b if bulge_frac else 1.0, n_arms=spiral.m, has_bar=barred, axis_ratio=main_q,
                 inclination_deg=math.degrees(math.acos(cos_i)), pitch_deg=spiral.pitch)
    return comps, truth


def sample_edge_on(rng: np.random.Generator, flux: float, r90: float) -> tuple[list[Component], dict, Dust | None]:
    """A thin inclined exponential disk, a low-index bulge and often a dust lane."""
    incl = float(rng.uniform(80, 90))
    h_over_r = float(rng.uniform(0.07, 0.16))
    bulge_frac = 0.0 if rng.random() < 0.2 else float(np.clip(rng.beta(1.5, 4.0), 0.03, 0.6))
    n_b = quantise_n(rng.uniform(1.0, 2.0))
    rho = float(rng.uniform(0.15, 0.4))
    parts = [(1 - bulge_frac, 1.0, 1.0)] + ([(bulge_frac, n_b, rho)] if bulge_frac else [])
    hlr, r90_unit = radii(parts)
    s = r90 / r90_unit
    pa = float(rng.uniform(0, 180))
    disk_gr = float(np.clip(rng.normal(0.64, 0.06), 0.45, 0.85))
    bulge_gr = float(np.clip(rng.normal(0.78, 0.04), 0.65, 0.9))
    comps = [Component("edge", flux * (1 - bulge_frac), disk_gr, colour_ri(disk_gr, rng), hlr=s, pa=pa, incl=incl,
                       h_over_r=h_over_r)]
    bq = float(rng.uniform(0.55, 0.9))
    if bulge_frac:
        comps.append(Component("sersic", flux * bulge_frac, bulge_gr, colour_ri(bulge_gr, rng), hlr=rho * s, n=n_b,
                               q=bq, pa=pa, grid=True))
    dust = None
    if rng.random() < 0.6:
        width = float(rng.uniform(0.08, 0.15)) * s
        side = 1 if rng.random() < 0.5 else -1
        offset = side * (0.4 * math.cos(math.radians(incl)) * s + float(rng.uniform(0, 0.3)) * width)
        dust = Dust(tau=float(rng.uniform(0.5, 0.9)), width=width, offset=offset,
                    length=float(rng.uniform(1.3, 2.2)) * s)
    q = math.sqrt(math.cos(math.radians(incl)) ** 2 + (h_over_r * math.sin(math.radians(incl))) ** 2)
    main_q = q if bulge_frac < 0.5 else bq
    truth = dict(bulge_frac=bulge_frac, hlr_arcsec=hlr * s, ellipticity=1 - main_q, position_angle=pa,
                 sersic_n=n_b if bulge_frac else 1.0, n_arms=0, has_bar=False, axis_ratio=main_q,
                 inclination_deg=incl, pitch_deg=np.nan)
    return comps, truth, dust


def sample_irregular(rng: np.random.Generator, flux: float, r90: float) -> tuple[list[Component], dict]:
    """Two or three overlapping clumpy components, many knots and often a tidal tail."""
    k = int(rng.integers(2, 4))
    fracs = rng.dirichlet([2.0] * k)
    knot_frac = float(rng.uniform(0.15, 0.3))
    tail_frac = float(rng.uniform(0.1, 0.2)) if rng.random() < 0.6 else 0.0
    body = 1 - knot_frac - tail_frac
    sizes = rng.uniform(0.4, 1.0, k)
    dists = np.concatenate([[0.0], rng.uniform(0.4, 1.3, k - 1)])
    angles = rng.uniform(0, 2 * math.pi, k)
    ns = [quantise_n(v) for v in rng.uniform(0.5, 1.5, k)]
    parts = [(body * f, n, math.hypot(h, d)) for f, n, h, d in zip(fracs, ns, sizes, dists)]
    parts.append((knot_frac + tail_frac, 1.0, 1.2))
    hlr, r90_unit = radii(parts)
    s = r90 / r90_unit
    clumps = []
    for f, n, h, d, a in zip(fracs, ns, sizes, dists, angles):
        gr = float(np.clip(rng.normal(0.42, 0.12), 0.15, 0.8))
        clumps.append(Component("sersic", flux * body * float(f), gr, colour_ri(gr, rng), hlr=float(h) * s, n=n,
                                q=float(rng.uniform(0.35, 1.0)), pa=float(rng.uniform(0, 180)),
                                x=float(d * math.cos(a)) * s, y=float(d * math.sin(a)) * s, grid=True))
    knot_gr = float(rng.normal(0.15, 0.07))
    comps = list(clumps)
    comps.append(Component("knots", flux * knot_frac, knot_gr, colour_ri(knot_gr, rng), npoints=int(rng.integers(30, 90)),
                           seed=seed_of(rng), clumps=clumps))
    if tail_frac:
        tgr = float(np.clip(rng.normal(0.45, 0.1), 0.2, 0.8))
        tail = Spiral(m=int(rng.choice([1, 2])), pitch=float(rng.uniform(30, 55)), phase=float(rng.uniform(0, 360)),
                      contrast=1.0, sharpness=float(rng.uniform(3, 6)), r_in=float(rng.uniform(0.6, 1.1)) * s,
                      gr=tgr, ri=colour_ri(tgr, rng))
        comps.append(Component("disk", flux * tail_frac, tgr, tail.ri, hlr=float(rng.uniform(1.5, 2.5)) * s,
                               q=float(rng.uniform(0.4, 1.0)), pa=float(rng.uniform(0, 180)), spiral=tail))
    main = clumps[int(np.argmax(fracs))]
    truth = dict(bulge_frac=0.0, hlr_arcsec=hlr * s, ellipticity=1 - main.q, position_angle=main.pa,
                 sersic_n=main.n, n_arms=0, has_bar=False, axis_ratio=main.q, inclination_deg=np.nan,
                 pitch_deg=np.nan)
    return comps, truth


def sample_field(rng: np.random.Generator, mag: float, r90: float, half: float, merger: bool) -> list[Component]:
    """Neighbour galaxies and foreground stars scattered over the 424 px frame (half = half-width, arcsec)."""
    out: list[Component] = []
    n_gal = int(rng.poisson(1.3)) + (1 if merger else 0)
    for j in range(n_gal):
        close = (merger and j == n_gal - 1) or rng.random() < 0.05
        while True:
            if close:
                rad, ang = rng.uniform(0.7, 1.5) * r90, rng.uniform(0, 2 * math.pi)
                x, y = rad * math.cos(ang), rad * math.sin(ang)
            else:
                x, y = rng.uniform(-half, half, 2)
            if math.hypot(x, y) > 0.7 * r90:
                break
        dm = float(rng.uniform(0.3, 2.0) if close else rng.uniform(0.5, 4.0))
        red = rng.random() < 0.4
        n = quantise_n(rng.uniform(3.0, 4.5)) if red else 1.0
        gr = float(rng.normal(0.78, 0.05) if red else rng.normal(0.5, 0.1))
        hlr = r90 * 10 ** (-0.16 * dm) * float(rng.uniform(0.2, 0.45))
        out.append(Component("sersic", 10 ** ((22.5 - mag - dm) / 2.5), gr, colour_ri(gr, rng), hlr=hlr, n=n,
                             q=float(rng.uniform(0.3, 1.0)), pa=float(rng.uniform(0, 180)), x=float(x), y=float(y)))
    for _ in range(int(rng.poisson(0.9))):
        x, y = rng.uniform(-half, half, 2)
        if math.hypot(x, y) < 0.5 * r90:
            continue
        smag = float(14.5 + math.log10(1 + rng.random() * (10 ** (0.25 * 6.5) - 1)) / 0.25)
        gr = float(rng.uniform(0.3, 1.5))
        out.append(Component("point", 10 ** ((22.5 - smag) / 2.5), gr, float(0.1 + 0.35 * (gr - 0.3)),
                             x=float(x), y=float(y)))
    return out


def sample_galaxy(seed: int, index: int, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> Galaxy:
    """Galaxy number `index` of the synthetic set with this seed (depends on (seed, index) only)."""
    rng = np.random.default_rng([seed, index])
    cls = CLASSES[int(rng.choice(len(CLASSES), p=CLASS_PROBS))]
    mag = sample_mag(rng)
    r90_true = float(np.clip(8.0 * 10 ** (-0.16 * (mag - 16.3) + rng.normal(0, 0.1)), 3.5, 45.0))
    psf_fwhm = float(np.clip(rng.normal(1.4, 0.18), 0.95, 2.1))
    r90 = math.hypot(r90_true, 0.9 * psf_fwhm) * 10 ** float(rng.normal(0, 0.1))
    flux = 10 ** ((22.5 - mag) / 2.5)
    dust = None
    if cls == "elliptical":
        main, truth = sample_elliptical(rng, flux, r90_true)
    elif cls in ("spiral", "barred_spiral"):
        main, truth = sample_disk_galaxy(rng, flux, r90_true, barred=cls == "barred_spiral")
    elif cls == "edge_on":
        main, truth, dust = sample_edge_on(rng, flux, r90_true)
    else:
        main, truth = sample_irregular(rng, flux, r90_true)
    frame_scale = GZ2_SCALE_PER_R90 * r90
    merger = cls == "irregular" and rng.random() < 0.5
    fld = sample_field(rng, mag, r90_true, GZ2_FRAME_PX / 2 * frame_scale, merger)
    crop_half = GZ2_CROP_PX / 2 * frame_scale
    inside = [c for c in fld if abs(c.x) < crop_half and abs(c.y) < crop_half]
    g, r = band_fluxes(main)
    cache_scale = frame_scale * GZ2_CROP_PX / CACHE_REF_PX
    sky = tuple(float(s * rng.uniform(0.85, 1.2)) for s in SKY_SIGMA)
    gid = galaxy_id(index)
    truth = dict(
        id=gid, source="synthetic", split=split_of(gid, fractions), **{"class": cls},
        bulge_frac=float(truth["bulge_frac"]),
        hlr_px=float(truth["hlr_arcsec"] / cache_scale),
        hlr_arcsec=float(truth["hlr_arcsec"]),
        ellipticity=float(truth["ellipticity"]),
        position_angle=float(truth["position_angle"]),
        sersic_n=float(truth["sersic_n"]),
        mag_r=float(mag),
        color_gr=float(-2.5 * math.log10(g / r)),
        n_arms=int(truth["n_arms"]),
        has_bar=bool(truth["has_bar"]),
        n_neighbours=sum(c.kind == "sersic" for c in inside),
        n_stars=sum(c.kind == "point" for c in inside),
        axis_ratio=float(truth["axis_ratio"]),
        inclination_deg=float(truth["inclination_deg"]),
        pitch_deg=float(truth["pitch_deg"]),
        dust_lane=dust is not None,
        merger=merger,
        r90_arcsec=float(r90),
        frame_scale=float(frame_scale),
        psf_fwhm_arcsec=psf_fwhm,
    )
    return Galaxy(index=index, id=gid, cls=cls, r90=r90, psf_fwhm=psf_fwhm, psf_beta=3.0, sky=sky, main=main,
                  field=fld, dust=dust, noise_seed=seed_of(rng), truth=truth)
