"""Render a synthetic galaxy with GalSim in g, r, i and combine the bands like an SDSS colour JPEG.

Everything happens on a grid oversampled `oversample` times around the output field, with a
margin, and is convolved with one Moffat PSF (drawn by GalSim) by FFT:

- components modulated in the disk plane (exponential disks with logarithmic spiral arms, bars,
  edge-on InclinedExponential disks with dust lanes, star-forming knots from RandomKnots, stars)
  are drawn by GalSim in real space without the PSF, summed per band and Fourier transformed;
- cuspy Sersic profiles (bulges, ellipticals) are drawn by GalSim directly in Fourier space
  (drawKImage), which integrates the cusp exactly, and added to the band spectra;
- neighbour galaxies are drawn the same way on their own stamps, so their light never wraps.

The convolved grid is block-averaged to the output pixels (the pixel response). Fluxes end up in
nanomaggies per SDSS pixel (0.396"), the surface-brightness unit the colour stretch works in.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import galsim
import numpy as np
import scipy.fft as sfft
from scipy.ndimage import gaussian_filter

from galaxygen.data.synth_model import SDSS_PIXEL, Component, Dust, Galaxy, Spiral

GSPARAMS = galsim.GSParams(folding_threshold=2e-2, maxk_threshold=3e-2, kvalue_accuracy=1e-4,
                           xvalue_accuracy=1e-4)
UNIT_EXPONENTIAL = galsim.Exponential(half_light_radius=1.0, gsparams=GSPARAMS)
PSF_CUT = 2e-3
RGB_SCALES = (2.2, 1.4, 1.0)
SOFTENING = 0.22
SATURATION = 9.0

Layer = tuple[np.ndarray, float, float]


def weights(gr: float, ri: float) -> np.ndarray:
    """g, r, i flux per unit r-band flux of a component with colours g-r and r-i."""
    return np.array([10 ** (-0.4 * gr), 1.0, 10 ** (0.4 * ri)], dtype=np.float32)


def rotation(angle_deg: float) -> np.ndarray:
    """2x2 counter-clockwise rotation matrix."""
    a = math.radians(angle_deg)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def disk_jacobian(q: float, pa: float) -> np.ndarray:
    """Map face-on disk-plane coordinates to the image: squash the minor axis by q, rotate by pa."""
    return rotation(pa) @ np.diag([1.0, q])


def transformed(prof: galsim.GSObject, jac: np.ndarray, flux: float, x: float, y: float) -> galsim.GSObject:
    """Apply a Jacobian, set the flux and shift a GalSim profile."""
    return prof.transform(*jac.ravel()).withFlux(flux).shift(x, y)


def sersic_profile(c: Component) -> galsim.GSObject:
    """A projected Sersic component (major-axis half-light radius c.hlr)."""
    prof = galsim.Sersic(c.n, half_light_radius=c.hlr, gsparams=GSPARAMS)
    return transformed(prof, disk_jacobian(c.q, c.pa), c.flux, c.x, c.y)


@functools.lru_cache(maxsize=16)
def base_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre offsets (y, x) from the true centre of an n x n image, in pixels."""
    c = np.arange(n, dtype=np.float32) - (n - 1) / 2
    y, x = np.meshgrid(c, c, indexing="ij")
    y.flags.writeable = x.flags.writeable = False
    return y, x


def quantise_fwhm(fwhm_px: float) -> float:
    """Round a PSF FWHM (pixels) to a 3% logarithmic grid so PSF spectra are reused."""
    return round(math.exp(round(math.log(max(fwhm_px, 0.5)) / 0.03) * 0.03), 4)


@functools.lru_cache(maxsize=512)
def psf_spectrum(fwhm_px: float, beta: float, n: int) -> tuple[np.ndarray, int]:
    """Low-frequency block (2h, h) of the rfft of a unit Moffat PSF on an n x n grid, and h.

    Frequencies with |f| >= h (in cycles per grid) are dropped: the PSF transmits less than PSF_CUT there.
    """
    psf = galsim.Moffat(beta, fwhm=fwhm_px, gsparams=GSPARAMS)
    img = psf.drawImage(nx=n, ny=n, scale=1.0, method="no_pixel", offset=(0.5, 0.5)).array.astype(np.float64)
    spec = np.fft.rfft2(np.fft.ifftshift(img / img.sum()))
    fy = np.abs(np.fft.fftfreq(n) * n)[:, None]
    fx = np.arange(n // 2 + 1)[None, :]
    reach = np.maximum(fy, fx)[np.abs(spec) > PSF_CUT]
    half = int(min(n // 2, reach.max() + 2))
    return spec[block_rows(n, half), :half].astype(np.complex64), half


@functools.lru_cache(maxsize=256)
def block_rows(n: int, half: int) -> np.ndarray:
    """Rows of an n-point FFT holding the frequencies -half..half-1."""
    return np.r_[0:half, n - half : n]


@functools.lru_cache(maxsize=256)
def centre_phase(n: int, half: int) -> np.ndarray:
    """Phase factors (2h, h) putting a profile's origin at the true centre (n-1)/2 of an n-pixel grid."""
    c = (n - 1) / 2
    rows = np.exp(-2j * np.pi * np.r_[0:half, -half:0] * c / n)
    cols = np.exp(-2j * np.pi * np.arange(half) * c / n)
    return (rows[:, None] * cols[None, :]).astype(np.complex64)


def k_block(prof: galsim.GSObject, n: int, scale: float, half: int) -> np.ndarray:
    """Low-frequency block (2h, h) of the rfft of a profile sampled on an n x n grid, from GalSim's drawKImage."""
    kimg = prof.drawKImage(nx=2 * half, ny=2 * half, scale=2 * math.pi / (n * scale)).array
    return np.fft.ifftshift(kimg)[:, :half] * centre_phase(n, half)


def from_block(block: np.ndarray, n: int, half: int) -> np.ndarray:
    """Real image(s) n x n from low-frequency rfft block(s) (..., 2h, h)."""
    full = np.zeros((*block.shape[:-2], n, n // 2 + 1), dtype=np.complex64)
    full[..., block_rows(n, half), :half] = block
    return sfft.irfft2(full, s=(n, n))


class Grid:
    """The oversampled pre-PSF grid: n x n pixels of `scale` arcsec centred on the galaxy."""

    def __init__(self, n: int, scale: float):
        self.n = n
        self.scale = scale
        py, px = base_grid(n)
        self.y = py * np.float32(scale)
        self.x = px * np.float32(scale)

    def draw(self, prof: galsim.GSObject) -> np.ndarray:
        """Surface brightness samples (flux per pixel) of a profile, without PSF or pixel."""
        return prof.drawImage(nx=self.n, ny=self.n, scale=self.scale, method="no_pixel").array

    def face_on(self, q: float, pa: float, x0: float, y0: float) -> tuple[np.ndarray, np.ndarray]:
        """Disk-plane coordinates (u, v) of every grid pixel for a disk of axis ratio q at angle pa."""
        a = math.radians(pa)
        cos, sin = np.float32(math.cos(a)), np.float32(math.sin(a))
        dx, dy = self.x - np.float32(x0), self.y - np.float32(y0)
        return dx * cos + dy * sin, (dy * cos - dx * sin) / np.float32(q)

    def deposit(self, out: np.ndarray, xs: np.ndarray, ys: np.ndarray, flux: np.ndarray) -> None:
        """Add point sources at (xs, ys) arcsec to out (n x n) with bilinear weights."""
        fx = xs / self.scale + (self.n - 1) / 2
        fy = ys / self.scale + (self.n - 1) / 2
        ix, iy = np.floor(fx).astype(int), np.floor(fy).astype(int)
        tx, ty = fx - ix, fy - iy
        for dx, dy, w in ((0, 0, (1 - tx) * (1 - ty)), (1, 0, tx * (1 - ty)), (0, 1, (1 - tx) * ty), (1, 1, tx * ty)):
            jx, jy = ix + dx, iy + dy
            ok = (jx >= 0) & (jx < self.n) & (jy >= 0) & (jy < self.n)
            np.add.at(out, (jy[ok], jx[ok]), (flux * w)[ok])


def arm_shape(u: np.ndarray, v: np.ndarray, sp: Spiral) -> tuple[np.ndarray, np.ndarray]:
    """Arm pattern in [0, 1] along logarithmic spirals, and the radial window switching arms on past r_in."""
    r = np.hypot(u, v) + np.float32(1e-6)
    theta = np.arctan2(v, u)
    lnr = np.log(r / np.float32(sp.r_in))
    phase = np.float32(math.radians(sp.phase))
    phi = np.float32(sp.m) * (theta - phase - lnr * np.float32(1 / math.tan(math.radians(sp.pitch))))
    if sp.wobble:
        phi = phi + np.float32(sp.wobble) * np.sin(np.float32(2.0) * lnr + np.float32(sp.wobble_phase))
    shape = (np.float32(0.5) + np.float32(0.5) * np.cos(phi)) ** np.float32(sp.sharpness)
    if sp.lopsided:
        shape = shape * (1 + np.float32(sp.lopsided) * np.cos(theta - phase))
    window = 1 / (1 + np.exp((np.float32(sp.r_in) - r) / np.float32(0.2 * sp.r_in)))
    return shape, window


def mean_shape(p: float) -> float:
    """Azimuthal mean of ((1 + cos phi) / 2) ** p."""
    return math.gamma(p + 0.5) / (math.sqrt(math.pi) * math.gamma(p + 1))


def draw_disk(c: Component, grid: Grid) -> list[Layer]:
    """An exponential disk, split into its smooth part and its (bluer) spiral arms."""
    img = grid.draw(transformed(UNIT_EXPONENTIAL.dilate(c.hlr), disk_jacobian(c.q, c.pa), c.flux, c.x, c.y))
    sp = c.spiral
    if sp is None:
        return [(img, c.gr, c.ri)]
    shape, window = arm_shape(*grid.face_on(c.q, c.pa, c.x, c.y), sp)
    arms = img * window * shape * np.float32(sp.contrast / mean_shape(sp.sharpness))
    smooth = img * (1 - np.float32(sp.contrast) * window)
    return [(smooth, c.gr, c.ri), (arms, sp.gr, sp.ri)]


def draw_edge(c: Component, grid: Grid) -> list[Layer]:
    """A thick exponential disk seen at inclination c.incl (GalSim InclinedExponential)."""
    prof = galsim.InclinedExponential(c.incl * galsim.degrees, half_light_radius=c.hlr, scale_h_over_r=c.h_over_r,
                                      flux=c.flux, gsparams=GSPARAMS)
    return [(grid.draw(prof.rotate(c.pa * galsim.degrees).shift(c.x, c.y)), c.gr, c.ri)]


def draw_bar(c: Component, grid: Grid) -> list[Layer]:
    """A bar: a flat-topped, elongated Sersic (n = c.n, about 0.4) in the disk plane, projected like its disk."""
    jac = disk_jacobian(c.q, c.pa) @ rotation(c.bar_angle) @ np.diag([1.0, c.bar_q])
    prof = galsim.Sersic(c.n, half_light_radius=c.hlr, gsparams=GSPARAMS)
    return [(grid.draw(transformed(prof, jac, c.flux, c.x, c.y)), c.gr, c.ri)]


def knot_positions(c: Component) -> np.ndarray:
    """Image positions (k, 2) of star-forming knots from GalSim RandomKnots (thinned onto spiral arms)."""
    rng = galsim.BaseDeviate(c.seed)
    if c.clumps:
        total = sum(k.flux for k in c.clumps)
        out = []
        for k in c.clumps:
            npts = max(1, round(c.npoints * k.flux / total))
            pts = galsim.RandomKnots(npts, profile=UNIT_EXPONENTIAL, rng=rng).points * k.hlr
            out.append(pts @ disk_jacobian(k.q, k.pa).T + np.array([k.x, k.y]))
        return np.concatenate(out)
    pts = galsim.RandomKnots(c.npoints, profile=UNIT_EXPONENTIAL, rng=rng).points * c.hlr
    pts = pts[np.hypot(pts[:, 0], pts[:, 1]) < 2.2 * c.hlr]
    if c.spiral is not None:
        shape, window = arm_shape(pts[:, 0], pts[:, 1], c.spiral)
        keep = np.random.default_rng(c.seed).random(len(pts)) < 0.1 + 0.9 * shape * window
        pts = pts[keep]
    return pts @ disk_jacobian(c.q, c.pa).T + np.array([c.x, c.y])


def draw_knots(c: Component, grid: Grid) -> list[Layer]:
    """Star-forming knots as unresolved points of exponentially distributed brightness."""
    pts = knot_positions(c)
    img = np.zeros((grid.n, grid.n), dtype=np.float32)
    if len(pts):
        w = np.random.default_rng(c.seed + 1).gamma(2.0, 1.0, len(pts))
        grid.deposit(img, pts[:, 0], pts[:, 1], c.flux * w / w.sum())
    return [(img, c.gr, c.ri)]


def draw_grid_sersic(c: Component, grid: Grid) -> list[Layer]:
    """A low-index Sersic component sampled on the grid (so dust lanes act on it)."""
    return [(grid.draw(sersic_profile(c)), c.gr, c.ri)]


GRID_DRAWERS = {"disk": draw_disk, "edge": draw_edge, "bar": draw_bar, "knots": draw_knots,
                "sersic": draw_grid_sersic}


def dust_transmission(dust: Dust, pa: float, grid: Grid) -> np.ndarray:
    """Transmission of a dust lane along the major axis (position angle pa)."""
    along, across = grid.face_on(1.0, pa, 0.0, 0.0)
    lane = np.exp(-0.5 * ((across - dust.offset) / dust.width) ** 2 - 0.5 * (along / dust.length) ** 2)
    return 1 - np.float32(dust.tau) * lane


def add_neighbour(c: Component, conv: np.ndarray, grid: Grid, fwhm_px: float, beta: float) -> None:
    """Add a PSF-convolved neighbour galaxy, drawn in Fourier space on its own stamp, to conv (3, n, n)."""
    s, n = grid.scale, grid.n
    ns = min(n, 16 * math.ceil(2 * (8 * c.hlr / s + 3 * fwhm_px) / 16))
    fx, fy = c.x / s + (n - 1) / 2, c.y / s + (n - 1) / 2
    x0, y0 = round(fx) - ns // 2, round(fy) - ns // 2
    if x0 >= n or y0 >= n or x0 + ns <= 0 or y0 + ns <= 0:
        return
    centre = (ns - 1) / 2
    local = dataclasses.replace(c, x=(fx - x0 - centre) * s, y=(fy - y0 - centre) * s)
    psf, half = psf_spectrum(fwhm_px, beta, ns)
    stamp = from_block(k_block(sersic_profile(local), ns, s, half) * psf, ns, half)
    ya, yb, xa, xb = max(y0, 0), min(y0 + ns, n), max(x0, 0), min(x0 + ns, n)
    cut = stamp[ya - y0 : yb - y0, xa - x0 : xb - x0]
    conv[:, ya:yb, xa:xb] += weights(c.gr, c.ri)[:, None, None] * cut


def block_sum(img: np.ndarray, k: int) -> np.ndarray:
    """Sum k x k blocks of the last two axes (pixel integration onto a k-times coarser grid)."""
    if k == 1:
        return img
    out = img[:, 0::k, 0::k].copy()
    for dy in range(k):
        for dx in range(k):
            if dx or dy:
                out += img[:, dy::k, dx::k]
    return out


def sky_noise(gal: Galaxy, npix: int, scale: float) -> np.ndarray:
    """SDSS-like sky noise per band in nanomaggies per SDSS pixel, correlated when pixels are finer."""
    rng = np.random.default_rng([gal.noise_seed, npix])
    noise = rng.standard_normal((3, npix, npix), dtype=np.float32)
    ratio = SDSS_PIXEL / scale
    if ratio > 1.5:
        sigma = 0.4 * ratio
        noise = gaussian_filter(noise, sigma=(0, sigma, sigma), mode="wrap") * np.float32(2 * math.sqrt(math.pi) * sigma)
    level = np.array(gal.sky, dtype=np.float32) * np.float32(min(1.0, ratio))
    return noise * level[:, None, None]


def render(gal: Galaxy, npix: int, scale: float, oversample: int = 2, margin: int = 4, noise: bool = True) -> np.ndarray:
    """g, r, i images (3, npix, npix) of a galaxy at `scale` arcsec/pixel, row 0 at the top."""
    n = (npix + 2 * margin) * oversample
    grid = Grid(n, scale / oversample)
    fwhm_px = quantise_fwhm(gal.psf_fwhm / grid.scale)
    psf, half = psf_spectrum(fwhm_px, gal.psf_beta, n)
    pre = np.zeros((3, n, n), dtype=np.float32)
    spec = np.zeros((3, 2 * half, half), dtype=np.complex64)
    for c in gal.main:
        if c.kind == "sersic" and not c.grid:
            spec += weights(c.gr, c.ri)[:, None, None] * k_block(sersic_profile(c), n, grid.scale, half)
            continue
        for img, gr, ri in GRID_DRAWERS[c.kind](c, grid):
            pre += weights(gr, ri)[:, None, None] * img
    if gal.dust is not None:
        pre *= dust_transmission(gal.dust, gal.main[0].pa, grid)[None]
    half_width = n * grid.scale / 2
    stars = [c for c in gal.field if c.kind == "point" and max(abs(c.x), abs(c.y)) < half_width]
    if stars:
        xs, ys = np.array([c.x for c in stars]), np.array([c.y for c in stars])
        for b in range(3):
            grid.deposit(pre[b], xs, ys, np.array([c.flux * weights(c.gr, c.ri)[b] for c in stars]))
    spec += sfft.rfft2(pre)[:, block_rows(n, half), :half]
    conv = from_block(spec * psf, n, half)
    for c in gal.field:
        if c.kind == "sersic":
            add_neighbour(c, conv, grid, fwhm_px, gal.psf_beta)
    image = block_sum(conv, oversample)[:, margin : margin + npix, margin : margin + npix]
    image *= np.float32((SDSS_PIXEL / scale) ** 2)
    if noise:
        image += sky_noise(gal, npix, scale)
    return np.ascontiguousarray(image[:, ::-1, :])


def to_rgb(bands: np.ndarray) -> np.ndarray:
    """SDSS-style colour image (H, W, 3) uint8 from g, r, i: i->R, r->G, g->B with an asinh stretch.

    Lupton et al. (2004): the stretch acts on the mean intensity and every channel is scaled by
    the same factor, so colours are preserved; pixels brighter than white keep their hue.
    """
    g, r, i = bands
    rgb = np.stack([i * RGB_SCALES[2], r * RGB_SCALES[1], g * RGB_SCALES[0]], axis=-1)
    inten = rgb.mean(axis=-1)
    pos = np.maximum(inten, 1e-12)
    norm = math.asinh(SATURATION / SOFTENING)
    factor = np.where(inten > 0, np.arcsinh(pos / SOFTENING) / (norm * pos), 0.0).astype(np.float32)
    rgb = np.clip(rgb * factor[..., None], 0, None)
    rgb /= np.maximum(rgb.max(axis=-1, keepdims=True), 1.0)
    return (rgb * 255 + 0.5).astype(np.uint8)
