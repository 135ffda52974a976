"""The ledger of `bench travel` results: every lever of every saved comparison with the README's
decision rule applied by code, and the defaults' own spread from run to run.

Why: the travel section of the README has grown by one hand-written verdict per session, over
different splits, budgets and machines. A verdict read off a table by eye is the kind of number
that can be wrong without anyone noticing; here the rule is a function of the saved figures, so
`melanogan bench ledger docs/measurements/travel-*.json` recomputes every verdict, and a new
comparison is judged the same way as the old ones.

The rule (README, "Models that travel", fixed before the first comparison): a lever becomes the
default only if its AUC difference against the defaults on the report parts is positive with every
source held out (all three), Holm-significant (p < 0.05, Holm over the comparison's levers and
sources) with at least one, and the internal test AUC does not fall below the defaults' 95% CI.
With several training seeds (`--repeats`) the pooled comparison over seeds decides the external
conditions and every seed must keep the internal one.

Identical-settings controls (a variant that sets only the defaults' own values, `bench travel`'s
`controls`) are not judged by the rule: they train the defaults' settings with the defaults' training
seed again, so their differences are run-to-run noise (CPU arithmetic is not bit-reproducible, and
with --match-steps the step schedule differs from the clock's), a lower bound on what another training
seed moves. Comparisons run with several training seeds (--repeats) show the latter: the defaults
trained with another seed on the same split and report images. Per held-out source the noise floor is
the largest of either (`noise_floor`); a lever that passes is flagged when none of its
Holm-significant gains is larger than the floor with that source held out (one seed's paired
bootstrap resamples the report images, not the training, so it can call noise of that size
significant). The flag adds to the verdict's reason; the rule itself, fixed before the first
comparison, is not changed.

One split is not enough (`replications`): exposure normalisation passed every condition on split
40000, Holm-significant with all three sources, and lost with two of them on split 43000. So a setting
measured on several splits, either way round (a lever on one split, its reversal when it had become the
default on another), is followed across them on one scale, on minus off; a pass stands only while every
other comparison of the setting finds on minus off positive with a majority of the sources it held out
(two of three: the criterion committed before the white-level replications on splits 41000 and 43000).
A pass that did not replicate keeps its verdict (the rule read that split correctly) and says so in its
reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from melanogan.bench import travel
from melanogan.bench.travel import NAMES
from melanogan.errors import MelanoganError

SOURCES = tuple(sorted(travel.SOURCES))  # the columns, in a fixed order
ALPHA = 0.05
# Controls of comparisons saved before `bench travel` recorded them (its JSON's `controls`): each was
# pre-registered as one in the README before its run ("The crop's aspect range again ... with an
# identical-settings control"; "Random greyscale at equal steps, with the identical-settings control").
KNOWN_CONTROLS = {"travel-match_steps-split30000.json": ["augment=classic"],
                  "travel-grayscale-split31000.json": ["augment=classic"]}
# The defaults' value of a setting a comparison changed, for files saved before `bench travel` recorded
# its defaults' cache options (split 42000): the README's pre-registrations say what they were
# (exposure normalisation was off when split 40000 turned it on, and the default when split 41000
# turned it off). Without it a lever and its reversal could not be put on one scale.
KNOWN_DEFAULTS = {"travel-white_level-split40000.json": {"white_level": 0},
                  "travel-white_level_off-split41000.json": {"white_level": 180}}


def load(paths: list[Path]) -> dict[str, dict]:
    """{file name: results} for each saved `bench travel --json` file, checked to be one."""
    out = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise MelanoganError(f"{path}: no such file; give the JSON files written by `bench travel --json`.")
        try:
            results = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MelanoganError(f"{path}: not JSON ({exc}); give the files written by `bench travel --json`.") \
                from None
        if not isinstance(results, dict) or not isinstance(results.get("rows"), list) or "levers" not in results:
            raise MelanoganError(f"{path}: not a `bench travel --json` result (no 'rows' and 'levers').")
        if path.name in out:
            raise MelanoganError(f"{path}: two files named {path.name}; the ledger names comparisons by file name.")
        if "controls" not in results and path.name in KNOWN_CONTROLS:
            results["controls"] = KNOWN_CONTROLS[path.name]
        out[path.name] = results
    return out


def verdict(results: dict, lever: str) -> dict:
    """The decision rule applied to one lever of one comparison: per held-out source its difference
    vs the defaults [CI], Holm p and internal-AUC check, and the verdict with the condition that
    decided it ("default", "fails: ...", "site option: ..." for a lever that fits the site's labels, or
    "undecided: ..." when a source was not held out and
    nothing else failed)."""
    rows = results["rows"]
    pooled = {c["held_out"]: c for c in results.get("combined") or [] if c["variant"] == lever}
    sources = {}
    for held in SOURCES:
        mine = [r for r in rows if r["held_out"] == held and r.get("variant") == lever and "vs_defaults" in r]
        if not mine:
            continue
        # external conditions: the pooled comparison over seeds where there is one, else the single run
        ext = pooled.get(held) or mine[0]["vs_defaults"]
        internal_ok, internal_known = True, True
        for r in mine:
            base = [d for d in rows if d["held_out"] == held and d.get("variant") == "defaults"
                    and d.get("repeat", 0) == r.get("repeat", 0)]
            ci = base[0].get("internal_test_auc_ci95") if base else None
            if ci is None:
                internal_known = False
            elif r["internal_test_auc"] < ci[0]:
                internal_ok = False
        sources[held] = {"difference": ext["difference"], "ci95": ext["ci95"], "p_holm": ext.get("p_holm"),
                         "seeds": len(mine), "internal_within_ci": internal_ok if internal_known else None}
    if lever in results.get("controls", ()):
        return {"lever": lever, "verdict": "control", "reason": "the defaults' own settings and training seed, "
                "trained again: its differences are run-to-run noise", "sources": sources}
    decided = _decide(sources)
    if decided["verdict"] == "default" and uses_site_labels(lever):
        # it trains on the held-out source's own labelled cases: no default of prepare + train can do
        # that, and a source it fitted is no longer one the model never saw
        decided = {"verdict": "site option", "reason": decided["reason"] + "; it fits the site's labelled cases, "
                   "so it is a calibrate option, not a default"}
    return {"lever": lever, **decided, "sources": sources}


def uses_site_labels(lever: str) -> bool:
    """Whether a lever learns from the held-out site's labels (adapt=head: the head refitted on them)."""
    return "adapt=head" in lever.split("+")


def _decide(sources: dict) -> dict:
    negative = [h for h, s in sources.items() if not s["difference"] > 0]
    if negative:
        return {"verdict": "fails", "reason": "not positive with " + ", ".join(NAMES[h] for h in negative)
                + " held out"}
    fell = [h for h, s in sources.items() if s["internal_within_ci"] is False]
    if fell:
        return {"verdict": "fails", "reason": "internal test AUC below the defaults' CI with "
                + ", ".join(NAMES[h] for h in fell) + " held out"}
    missing = [h for h in SOURCES if h not in sources]
    if missing:
        return {"verdict": "undecided", "reason": ", ".join(NAMES[h] for h in missing) + " not held out"}
    if not any(s["p_holm"] is not None and s["p_holm"] < ALPHA for s in sources.values()):
        return {"verdict": "fails", "reason": "positive everywhere, Holm-significant nowhere"}
    if any(s["internal_within_ci"] is None for s in sources.values()):
        return {"verdict": "default", "reason": "external conditions hold; the internal CI was not recorded"}
    return {"verdict": "default", "reason": "every condition holds"}


def ledger(results: dict[str, dict]) -> list[dict]:
    """One entry per lever per comparison, in file order: the file, its split seed, training seeds,
    the defaults' input size, whether the run completed and whether the levers trained the defaults'
    steps (`--match-steps`) or their own clock, and the lever's verdict, a pass flagged where its gains
    are no larger than the run-to-run noise (`noise_floor`) or where another split did not replicate it
    (`replications`)."""
    floor = noise_floor(results)
    unreplicated = {(r["file"], r["lever"]): s["standing"] for s in replications(results)
                    for r in s["runs"] if s["standing"].startswith("not replicated")}
    out = []
    for name, res in results.items():
        for lever in res["levers"]:
            v = verdict(res, lever)
            if v["verdict"] in ("default", "site option"):
                v["reason"] += _within_noise(v["sources"], floor)
                if (name, lever) in unreplicated:
                    v["reason"] += "; " + unreplicated[(name, lever)]
            out.append({"file": name, "split_seed": res.get("seed"), "train_seeds": res.get("train_seeds") or
                        [res.get("seed")], "image_size": res.get("image_size"),
                        "complete": res.get("complete") is not False, "match_steps": bool(res.get("match_steps")),
                        **v})
    return out


def _value(v) -> str:
    """A setting's value in one spelling: 2, 2.0 and "2" alike; true/True alike."""
    try:
        return f"{float(v):g}"
    except (TypeError, ValueError):
        return str(v).lower()


def defaults_value(name: str, results: dict, key: str):
    """What the defaults had for `key` in one comparison, None where the file does not say: the input
    size (recorded in every file), `prepare`'s options (`cache_options`, since split 42000) or
    `KNOWN_DEFAULTS` for the files before it."""
    if key == "image_size":
        return results.get("image_size")
    cache = results.get("cache_options") or {}
    if key in cache:
        return cache[key]
    return KNOWN_DEFAULTS.get(name, {}).get(key)


def replicates(on_minus_off: dict[str, float]) -> bool:
    """The replication criterion: on minus off positive with a majority of the sources held out
    (two of three; a comparison that held out one source needs that one)."""
    return _positive(on_minus_off) * 2 > len(on_minus_off)


def _positive(on_minus_off: dict[str, float]) -> int:
    return sum(d > 0 for d in on_minus_off.values())


def replications(results: dict[str, dict]) -> list[dict]:
    """Every setting measured on more than one split seed, on one scale (on minus off) per comparison,
    and its standing under the replication criterion.

    A single-setting lever whose defaults' value is known (`defaults_value`) is the pair of values
    {lever's, defaults'}, "on" being the lever's value where it was first measured (lowest split seed):
    white_level=180 against a default of 0 and white_level=0 against a default of 180 are one setting,
    the second's differences negated. Other levers (several settings, or a default the file does not
    record) are matched by their exact text. Controls are not levers and are left out.

    Standing: "never passed the rule" when no comparison passed it in the "on" direction; "replicated
    on split ..." when every other comparison of the setting satisfies `replicates`; "not replicated
    (split S: on minus off positive with k of n held out)" otherwise. A comparison that held out no
    source is skipped."""
    groups: dict[tuple, list] = {}
    for name, res in results.items():
        for lever in res["levers"]:
            if lever in res.get("controls", ()):
                continue
            v = verdict(res, lever)
            if not v["sources"]:
                continue
            key, _, val = lever.partition("=")
            default = defaults_value(name, res, key) if "+" not in lever and val else None
            ident = ("pair", key, frozenset({_value(val), _value(default)})) if default is not None \
                and _value(default) != _value(val) else ("text", lever)
            groups.setdefault(ident, []).append({"file": name, "split_seed": res.get("seed"), "lever": lever,
                                                 "value": _value(val), "verdict": v["verdict"],
                                                 "sources": v["sources"]})
    out = []
    for ident, runs in groups.items():
        if len({r["split_seed"] for r in runs}) < 2:
            continue
        runs.sort(key=lambda r: (r["split_seed"] is None, r["split_seed"], r["file"]))
        on = runs[0]["value"]
        if ident[0] == "pair":
            off = next(iter(ident[2] - {on}))
            label = f"{ident[1]} {off} -> {on}"
        else:
            label = ident[1]
        for r in runs:
            r["sign"] = 1 if ident[0] == "text" or r["value"] == on else -1
            r["on_minus_off"] = {h: round(r["sign"] * s["difference"], 4) for h, s in r["sources"].items()}
        passes = [r for r in runs if r["sign"] == 1 and r["verdict"] in ("default", "site option")]
        if not passes:
            standing = "never passed the rule"
        else:
            first = passes[0]
            failed = [r for r in runs if r is not first and not replicates(r["on_minus_off"])]
            if failed:
                r = failed[0]
                standing = (f"not replicated (split {r['split_seed']}: on minus off positive with "
                            f"{_positive(r['on_minus_off'])} of "
                            f"{len(r['on_minus_off'])} sources held out)")
            else:
                standing = "replicated on split " + ", ".join(
                    str(r["split_seed"]) for r in runs if r is not first)
                if first["verdict"] == "site option":
                    standing += " (a site option)"
        out.append({"setting": label, "standing": standing,
                    "runs": [{k: r[k] for k in ("file", "split_seed", "lever", "verdict", "on_minus_off")}
                             for r in runs]})
    return sorted(out, key=lambda s: s["setting"])


def control_noise(results: dict[str, dict]) -> dict[str, float]:
    """Per held-out source, the largest |difference| of any identical-settings control in `results`
    (the defaults' settings and training seed trained again). Sources no control held out are absent."""
    floor: dict[str, float] = {}
    for res in results.values():
        for lever in res.get("controls", ()):
            for held, s in verdict(res, lever)["sources"].items():
                floor[held] = max(floor.get(held, 0.0), abs(s["difference"]))
    return floor


def seed_noise(results: dict[str, dict]) -> dict[str, float]:
    """Per held-out source, the largest difference in external AUC between two runs of the defaults
    with different training seeds on the same split, so on the same report images (comparisons run
    with --repeats). Same-seed controls miss this part: another seed starts from other weights and
    draws other batches, which moves a from-scratch model further than CPU arithmetic does. Sources
    no comparison repeated are absent."""
    floor: dict[str, float] = {}
    for res in results.values():
        for held in SOURCES:
            runs = {r.get("train_seed", r.get("repeat", 0)): r["external_auc"] for r in res["rows"]
                    if r["held_out"] == held and r.get("variant") == "defaults" and r.get("external_auc") is not None}
            if len(runs) > 1:
                spread = round(max(runs.values()) - min(runs.values()), 4)  # saved AUCs have 4 decimals
                floor[held] = max(floor.get(held, 0.0), spread)
    return floor


def noise_floor(results: dict[str, dict]) -> dict[str, float]:
    """Per held-out source, the larger of `control_noise` and `seed_noise`: what the protocol reads
    for a lever that changes nothing. Sources neither kind of run held out are absent."""
    same, other = control_noise(results), seed_noise(results)
    return {h: max(same.get(h, 0.0), other.get(h, 0.0)) for h in SOURCES if h in same or h in other}


def _within_noise(sources: dict, floor: dict[str, float]) -> str:
    """The flag for a passing lever whose Holm-significant gains are all within the noise floor
    (only sources a control or a repeated comparison held out can tell); "" otherwise."""
    gains = {h: s["difference"] for h, s in sources.items()
             if s["p_holm"] is not None and s["p_holm"] < ALPHA and s["difference"] > 0}
    if gains and all(h in floor and d <= floor[h] for h, d in gains.items()):
        largest = max(gains, key=gains.get)
        return (f"; but no significant gain is larger than the run-to-run noise "
                f"({NAMES[largest]} held out: {gains[largest]:+.3f} vs {floor[largest]:.3f}): repeat it "
                "(--repeats) before trusting it")
    return ""


def verdict_lines(results: dict) -> str:
    """One comparison's verdicts as text, one line per lever (what `bench travel` prints last)."""
    lines = []
    for lever in results.get("levers", []):
        v = verdict(results, lever)
        judged = "" if v["verdict"] == "control" else " by the rule"  # a control is not judged by it
        lines.append(f"{lever}: {v['verdict']}{judged} ({v['reason']})")
    return "\n".join(lines)


def preprocessing_label(cache: dict | None) -> str | None:
    """The defaults' cached pixels in a few words (`cache_options`, recorded since split 42000), None
    where the file does not say: `prepare`'s defaults changed over the comparisons (colour constancy,
    exposure normalisation), so the row must not borrow today's."""
    if not cache:
        return None
    parts = [str(cache.get("resize_mode", "crop")), "SoG" if cache.get("color_constancy") else "no SoG"]
    if cache.get("white_level"):
        parts.append(f"wl {cache['white_level']}")
    if cache.get("clahe"):
        parts.append(f"CLAHE {cache['clahe']:g}")
    if cache.get("hair_removal"):
        parts.append(f"hair ({cache.get('hair_method', 'blackhat')})")
    return ", ".join(parts)


def defaults_spread(results: dict[str, dict]) -> dict:
    """The defaults' external AUC per comparison and held-out source (the first training seed), and per
    source its range over the comparisons: how far the same pipeline moves from split to split and run
    to run, the yardstick a lever's effect has to beat."""
    runs, by_source = [], {h: [] for h in SOURCES}
    for name, res in results.items():
        first = (res.get("train_seeds") or [res.get("seed")])[0]
        auc, speeds, precisions = {}, [], set()
        for r in res["rows"]:
            if r.get("variant") == "defaults" and r.get("train_seed", first) == first and r.get("repeat", 0) == 0:
                auc[r["held_out"]] = {"external_auc": r["external_auc"], "epochs": r.get("epochs")}
                by_source[r["held_out"]].append(r["external_auc"])
                if r.get("train_img_per_s"):
                    speeds.append(r["train_img_per_s"])
                if r.get("precision"):  # recorded since split 39000
                    precisions.add(r["precision"])
        # The machine moves the defaults' figures too: the clock buys ~3x the steps where the CPU runs bf16
        # natively, so each comparison says how fast its defaults trained and, where recorded, in what precision.
        runs.append({"file": name, "split_seed": res.get("seed"), "image_size": res.get("image_size"), "auc": auc,
                     "img_per_s": float(np.median(speeds)) if speeds else None,
                     "precision": ", ".join(sorted(precisions)) or None,
                     "preprocessing": preprocessing_label(res.get("cache_options"))})
    summary = {h: {"runs": len(v), "min": min(v), "median": float(np.median(v)), "max": max(v),
                   "distinct_split_seeds": len({r["split_seed"] for r in runs if h in r["auc"]})}
               for h, v in by_source.items() if v}
    return {"runs": runs, "by_source": summary}


def ledger_table(results: dict[str, dict]) -> str:
    """The ledger and the defaults' spread as Markdown."""
    lines = ["| comparison (file) | split seed | training seeds | lever | " + " | ".join(
        f"{NAMES[h]} held out: difference [95% CI] (Holm p)" for h in SOURCES) + " | verdict by the rule |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in SOURCES) + " | --- |"]
    for e in ledger(results):
        cells = []
        for h in SOURCES:
            s = e["sources"].get(h)
            if s is None:
                cells.append("-")
                continue
            p = "n/a" if s["p_holm"] is None else f"{s['p_holm']:.3f}"
            internal = {False: ", internal below CI", None: ", internal CI n/a", True: ""}[s["internal_within_ci"]]
            cells.append(f"{s['difference']:+.3f} [{s['ci95'][0]:+.3f}, {s['ci95'][1]:+.3f}] ({p}){internal}")
        seeds = ", ".join(str(s) for s in e["train_seeds"])
        incomplete = " (run incomplete)" if not e["complete"] else ""
        matched = " (the defaults' steps)" if e["match_steps"] else ""
        lines.append(f"| {e['file']}{incomplete} | {e['split_seed']} | {seeds} | {e['lever']}{matched} | "
                     + " | ".join(cells) + f" | {e['verdict']}: {e['reason']} |")
    same, other = control_noise(results), seed_noise(results)
    if same or other:
        def listed(floor: dict[str, float]) -> str:
            return ", ".join(f"{NAMES[h]} {floor[h]:.3f}" for h in SOURCES if h in floor) or "none"
        lines += ["", "Run-to-run noise, the largest |difference| in external AUC with each source held out: "
                  f"identical-settings controls (the defaults' settings and training seed, trained again; not "
                  f"judged by the rule) {listed(same)}; the defaults trained with another seed on the same split "
                  f"(comparisons with --repeats) {listed(other)}. A pass whose significant gains are no larger "
                  "than the larger of the two is flagged in its verdict."]
    settings = replications(results)
    if settings:
        lines += ["", "Settings measured on more than one split, on one scale: on minus off (a comparison that "
                  "reversed a setting which had become the default has its differences negated). A pass stands "
                  "only while every other split finds on minus off positive with a majority of the sources it "
                  "held out:", "",
                  "| setting (off -> on) | split seed | lever as run | verdict by the rule | "
                  + " | ".join(NAMES[h] for h in SOURCES) + " | standing |",
                  "| --- | --- | --- | --- | " + " | ".join("---" for _ in SOURCES) + " | --- |"]
        for s in settings:
            for i, r in enumerate(s["runs"]):
                cells = [f"{r['on_minus_off'][h]:+.3f}" if h in r["on_minus_off"] else "-" for h in SOURCES]
                lines.append(f"| {s['setting'] if i == 0 else ''} | {r['split_seed']} | {r['lever']} | "
                             f"{r['verdict']} | " + " | ".join(cells) + f" | {s['standing'] if i == 0 else ''} |")
    spread = defaults_spread(results)
    lines += ["", "The defaults' external ROC-AUC in each comparison (first training seed):", "",
              "| comparison (file) | split seed | input | defaults' training speed (precision) | "
              + " | ".join(NAMES[h] for h in SOURCES) + " |",
              "| --- | --- | --- | --- | " + " | ".join("---" for _ in SOURCES) + " |"]
    for r in spread["runs"]:
        cells = [f"{r['auc'][h]['external_auc']:.3f}" if h in r["auc"] else "-" for h in SOURCES]
        speed = "-" if r["img_per_s"] is None else f"{r['img_per_s']:.0f} img/s"
        speed += f" ({r['precision'] or 'not recorded'})"
        pixels = f" ({r['preprocessing']})" if r["preprocessing"] else ""
        lines.append(f"| {r['file']} | {r['split_seed']} | {r['image_size']} px{pixels} | {speed} | "
                     + " | ".join(cells) + " |")
    cells = [(f"{s['min']:.3f}-{s['max']:.3f} (median {s['median']:.3f}; {_count(s['runs'], 'run')}, "
              f"{_count(s['distinct_split_seeds'], 'split')})") if (s := spread["by_source"].get(h)) else "-"
             for h in SOURCES]
    lines.append("| range | | | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
