"""Galaxy Zoo 2 style tables for synthetic galaxies: the filename mapping and a Hart et al. (2016)-like catalog.

Vote fractions are drawn around probabilities that follow the ground truth (an elliptical is
voted mostly smooth, a barred spiral mostly bar, ...), so a model trained on GZ2 labels can be
checked against the synthetic truth.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

OBJID_BASE = 587_700_000_000_000_000
SAMPLE = "original"

TASKS: dict[str, tuple[str, ...]] = {
    "t01_smooth_or_features": ("a01_smooth", "a02_features_or_disk", "a03_star_or_artifact"),
    "t02_edgeon": ("a04_yes", "a05_no"),
    "t03_bar": ("a06_bar", "a07_no_bar"),
    "t04_spiral": ("a08_spiral", "a09_no_spiral"),
    "t05_bulge_prominence": ("a10_no_bulge", "a11_just_noticeable", "a12_obvious", "a13_dominant"),
    "t06_odd": ("a14_yes", "a15_no"),
    "t07_rounded": ("a16_completely_round", "a17_in_between", "a18_cigar_shaped"),
    "t11_arms_number": ("a31_1", "a32_2", "a33_3", "a34_4", "a36_more_than_4", "a37_cant_tell"),
}


def dr7objid(seed: int, index: int) -> int:
    """A synthetic SDSS DR7-like object id, unique per (seed, index)."""
    return OBJID_BASE + (seed % 100_000_000) * 1_000_000_000 + index


def asset_id(index: int) -> int:
    """The GZ2 image asset id (file name stem) of galaxy number `index`."""
    return index + 1


def bulge_letter(bulge_frac: float) -> str:
    """GZ2 bulge prominence letter: a dominant, b obvious, c just noticeable, d none."""
    if bulge_frac >= 0.45:
        return "a"
    if bulge_frac >= 0.2:
        return "b"
    if bulge_frac >= 0.05:
        return "c"
    return "d"


def gz2_class(t: dict) -> str:
    """The GZ2 class string (Hart et al. 2016 grammar) that goes with a truth row."""
    cls = t["class"]
    if cls == "elliptical":
        q = t["axis_ratio"]
        return "E" + ("r" if q > 0.8 else "i" if q > 0.5 else "c")
    if cls == "edge_on":
        bulge = "r" if t["bulge_frac"] >= 0.15 else "b" if t["bulge_frac"] >= 0.05 else "n"
        return "Se" + bulge + ("(d)" if t["dust_lane"] else "")
    if cls == "irregular":
        return "Sd?" + ("(m)" if t["merger"] else "(i)")
    arms = "+" if t["n_arms"] > 4 else str(t["n_arms"])
    winding = "t" if t["pitch_deg"] < 15 else "m" if t["pitch_deg"] < 24 else "l"
    return "S" + ("B" if t["has_bar"] else "") + bulge_letter(t["bulge_frac"]) + arms + winding


def task_probabilities(t: dict) -> dict[str, np.ndarray]:
    """Expected answer probabilities of every task for one truth row."""
    cls, q, bf = t["class"], t["axis_ratio"], t["bulge_frac"]
    disk = cls in ("spiral", "barred_spiral")
    p = {
        "t01_smooth_or_features": {"elliptical": [0.88, 0.1, 0.02], "edge_on": [0.25, 0.73, 0.02],
                                   "irregular": [0.35, 0.6, 0.05]}.get(cls, [0.12, 0.86, 0.02]),
        "t02_edgeon": [0.9, 0.1] if cls == "edge_on" else
        [0.03 + 0.5 * float(np.clip((0.35 - q) / 0.3, 0, 1)), 0.0] if disk else [0.05, 0.0],
        "t03_bar": [0.8, 0.2] if t["has_bar"] else [0.06, 0.94],
        "t04_spiral": [0.88, 0.12] if disk else [0.2, 0.8] if cls == "edge_on" else
        [0.3, 0.7] if cls == "irregular" else [0.05, 0.95],
        "t05_bulge_prominence": {"d": [0.6, 0.3, 0.08, 0.02], "c": [0.1, 0.6, 0.27, 0.03],
                                 "b": [0.03, 0.25, 0.62, 0.1], "a": [0.02, 0.1, 0.38, 0.5]}[bulge_letter(bf)],
        "t06_odd": [0.85, 0.15] if cls == "irregular" else [0.4, 0.6] if t["dust_lane"] else [0.12, 0.88],
        "t07_rounded": [0.7, 0.27, 0.03] if q > 0.8 else [0.15, 0.75, 0.1] if q > 0.5 else [0.03, 0.37, 0.6],
    }
    p["t02_edgeon"][1] = 1 - p["t02_edgeon"][0]
    arms = np.full(6, 0.03)
    if t["n_arms"]:
        arms[min(t["n_arms"], 5) - 1] = 0.6
    arms[5] = 0.3
    p["t11_arms_number"] = arms
    return {k: np.asarray(v, dtype=float) / np.sum(v) for k, v in p.items()}


def hart16_row(t: dict, seed: int, index: int) -> dict:
    """One Hart16-like catalog row: ids, position, class string, vote counts and vote fractions."""
    rng = np.random.default_rng([seed, index, 16])
    ra, dec = float(rng.uniform(110, 260)), float(np.degrees(np.arcsin(rng.uniform(-0.1, 0.9))))
    n_class = int(rng.integers(38, 62))
    row = {
        "dr7objid": dr7objid(seed, index),
        "ra": ra,
        "dec": dec,
        "rastring": "{:02d}:{:02d}:{:05.2f}".format(*sexagesimal(ra / 15)),
        "decstring": ("-" if dec < 0 else "+") + "{:02d}:{:02d}:{:04.1f}".format(*sexagesimal(abs(dec))),
        "sample": SAMPLE,
        "gz2_class": gz2_class(t),
        "total_classifications": n_class,
        "total_votes": int(n_class * rng.uniform(4.5, 7.0)),
    }
    for task, probs in task_probabilities(t).items():
        frac = rng.dirichlet(probs * 25 + 0.2)
        debiased = 0.7 * frac + 0.3 * probs
        for answer, f, d in zip(TASKS[task], frac, debiased):
            row[f"{task}_{answer}_fraction"] = round(float(f), 3)
            row[f"{task}_{answer}_debiased"] = round(float(d), 3)
    return row


def sexagesimal(value: float) -> tuple[int, int, float]:
    """Degrees (or hours) as whole units, minutes and seconds."""
    whole = int(value)
    minutes = int((value - whole) * 60)
    seconds = ((value - whole) * 60 - minutes) * 60
    return whole, minutes, math.floor(seconds * 100) / 100


def gz2_tables(truth: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The Hart16-like catalog and gz2_filename_mapping tables of a synthetic truth table."""
    index = truth["id"].str.removeprefix("synth-").astype(int).to_numpy()
    hart = pd.DataFrame([hart16_row(t, seed, int(i)) for t, i in zip(truth.to_dict("records"), index)])
    mapping = pd.DataFrame({"objid": hart["dr7objid"], "sample": SAMPLE,
                            "asset_id": [asset_id(int(i)) for i in index]})
    return hart, mapping
