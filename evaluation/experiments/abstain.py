"""abstain: calibrated confidence, the risk-coverage curve, and telling out-of-memory queries apart.

A memory is built without the held-out classes. Its calibration split (in-memory classes only) is
evaluated and ``vmem calibrate`` fits and publishes the calibration (its defaults: a logistic fit on the
rank vote's share, margin and nearest similarity at k = 10, and the out-of-memory test of
memory.decide.out_of_memory at level 0.05 on the same split's 10th-neighbour similarities, as they are and
relative to the memory's own -- no out-of-memory query is used to fit either). Abstention combines them by abstaining when either says so.
The test split -- every class, so the held-out classes' queries are out of memory -- is then evaluated at
the calibrated version, and from its neighbour lists:

* ECE of the raw share and of the calibrated confidence on the in-memory queries (a split the calibration
  never saw), for every calibration method and score (fitted in-process, same code as ``vmem calibrate``);
* the risk-coverage curve: answer the most confident queries first; risk = wrong answers among those
  answered, an out-of-memory query being always wrong;
* AUROC of each score at telling in-memory from out-of-memory queries (1.0: perfectly separated), the
  k-th neighbour similarity (the test's statistic) among them; the combined rule ("either") ranks flagged
  queries last and the others by calibrated confidence;
* each out-of-memory statistic the test can compare (fitted in-process on the same split, as ``vmem
  calibrate --out-of-memory-statistic``), and combinations of their conformal p-values that are not one
  (Fisher's method and Bonferroni's minimum over the nearest and the k-th, the relative similarity alone):
  AUROC, the fraction flagged, and the "either" rule's separation and coverage with each;
* at other levels: the rule, and the single number it is not (``p_in * min(1, p / level)``), whose AUROC
  and ECE show why.

Finally ``VisualMemory.classify(embeddings, abstain_below=P)`` runs on the test embeddings: its
abstentions and their reasons must be exactly those the neighbour files predict.
"""

from __future__ import annotations

import os

import numpy as np

from evaluation import neighbors_io
from evaluation.experiments.common import pct, plot_lines, read_neighbors, write_report
from evaluation.experiments.workspace import Workspace, per_class_rows
from evaluation.stats import (auroc, coverage_at_risk, expected_calibration_error, reliability_bins,
                              risk_at_coverage, risk_coverage)

NAME = "abstain"
RULE, K = "rank", 10
THRESHOLDS = (0.5, 0.8, 0.9, 0.95)
# Out-of-memory levels the rule and the product are also measured at (the published calibration uses the default).
LEVELS = (0.01, 0.02, 0.05, 0.1, 0.2, 1.0)
# Scores of one property each of the vote or its neighbour similarities: the bar a combination must reach.
SINGLE_SCORES = ("share", "margin", "similarity", "kth_similarity", "calibrated")


def _calibrate(eval_dir: str, memory: str) -> None:
    """``vmem calibrate --evaluation EVAL_DIR --memory M --rule rank --k 10``: fit and publish (its defaults)."""
    from evaluation.calibration import fit_from_evaluation, read_evaluation  # pylint: disable=g-import-not-at-top
    from memory.decide.confidence import publish_calibration  # pylint: disable=g-import-not-at-top
    from memory.decide.out_of_memory import DEFAULT_LEVEL  # pylint: disable=g-import-not-at-top
    fit = fit_from_evaluation(read_evaluation(eval_dir), memory=memory, rule=RULE, k=K,
                              out_of_memory_level=DEFAULT_LEVEL)
    publish_calibration(fit.root, fit.calibration, expected_version=fit.calibration.fitted_on_version)


def _separation(score: np.ndarray, correct: np.ndarray, inside: np.ndarray) -> dict[str, float]:
    """AUROC in vs out of memory, ECE on in-memory queries, coverage at 5 % risk over all queries."""
    return {"auroc_in_vs_out": auroc(score[inside], score[~inside]),
            "ece_in_memory": expected_calibration_error(score[inside], correct[inside]),
            "coverage_at_risk_0.05": coverage_at_risk(risk_coverage(score, correct), 0.05)}


def _either(calibrated: np.ndarray, flagged: np.ndarray, p_out: np.ndarray | None = None) -> np.ndarray:
    """The order "abstain when either says so" answers in: unflagged queries by calibrated confidence, then the
    flagged ones, by calibrated confidence or (given ``p_out``) by the test's p-value (a key in [-1, 1], not a
    probability)."""
    return np.where(flagged, (calibrated if p_out is None else p_out) - 1.0, calibrated)


def _candidates(c_vc, c_ids, c_inside, vc, ids, entries, *, k: int, level: float
                ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Each candidate out-of-memory score of the test queries (higher: more like the memory) and, for a test,
    its p-values; fitted on the calibration split's in-memory queries only: the test's statistics, and
    p-value combinations."""
    from memory.decide.out_of_memory import (OutOfMemoryStatistic, conformal_p_value,  # pylint: disable=g-import-not-at-top
                                             fit_out_of_memory_test, relative_similarity)
    out = {}
    for statistic in OutOfMemoryStatistic:
        test = fit_out_of_memory_test(statistic.of(c_vc)[c_inside], level=level, statistic=statistic,
                                      neighbor_kth=entries.lookup(c_ids[c_inside, :k]), entries=entries)
        t = test.statistic_of(vc, ids)
        out[f"test:{statistic.value}"] = (t, test.p_value(t))
    n = int(c_inside.sum())
    p = {name: conformal_p_value(np.sort(c_x[c_inside]), n, x) for name, c_x, x in (
        ("nearest", c_vc.similarity, vc.similarity), ("kth", c_vc.kth_similarity, vc.kth_similarity))}
    out["fisher:nearest+kth"] = (np.log(p["nearest"]) + np.log(p["kth"]), None)
    out["bonferroni:nearest+kth"] = (np.minimum(p["nearest"], p["kth"]), None)
    relative = relative_similarity(vc.kth_similarity, entries.lookup(ids[:, :k]))
    out["relative_kth_alone"] = (np.nan_to_num(relative, nan=-2.0), None)
    return out


def run(ws: Workspace, out: str) -> dict:
    from memory.decide.confidence import (CalibrationMethod, ConfidenceScore, fit_on_confidence,  # pylint: disable=g-import-not-at-top
                                   memory_calibration, raw_score, vote_confidence)
    from evaluation.calibration import entry_similarities, neighbor_id_array  # pylint: disable=g-import-not-at-top
    from memory.decide.out_of_memory import AbstainReason  # pylint: disable=g-import-not-at-top
    from memory.store.versions import read_manifest  # pylint: disable=g-import-not-at-top
    from memory.visual_memory import VisualMemory  # pylint: disable=g-import-not-at-top
    s = ws.setup
    k = min(K, s.k_max)
    held = tuple(s.hold_out)
    train, calib, test = ws.table("train"), ws.table("calib"), ws.table("test")
    memory = ws.build("abstain", ws.write_table("abstain-train", train.take(~per_class_rows(train.labels, held))))
    _, calib_dir = ws.evaluate(memory, ws.write_table("abstain-calib", calib.take(~per_class_rows(calib.labels, held))),
                               "abstain-calib")
    _calibrate(calib_dir, memory)
    manifest = read_manifest(memory)
    calibration = memory_calibration(manifest, root=memory)
    ood = calibration.out_of_memory
    _, test_dir = ws.evaluate(memory, ws.split_spec("test"), "abstain-test")

    test_records = read_neighbors(test_dir)
    labels, distances, true, weights = neighbors_io.to_arrays(test_records, s.k_max)
    vc = vote_confidence(labels, distances, rule=RULE, k=k, entry_weights=weights)
    inside = true >= 0  # Query classes the memory does not know have true label -1.
    correct = (vc.labels == true) & inside
    ids = neighbor_id_array(test_records, k)
    calibrated = calibration.confidence(vc)
    p_out = calibration.out_of_memory_p(vc, ids)
    flagged = p_out < ood.level
    either = _either(calibrated, flagged)
    calib_records = read_neighbors(calib_dir)
    c_labels, c_distances, c_true, c_weights = neighbors_io.to_arrays(calib_records, s.k_max)
    c_vc = vote_confidence(c_labels, c_distances, rule=RULE, k=k, entry_weights=c_weights)
    vm = VisualMemory.open(memory)
    candidates = _candidates(c_vc, neighbor_id_array(calib_records, k), c_true >= 0, vc, ids,
                             entry_similarities(vm, k=k), k=k, level=ood.level)
    statistics = {}
    for name, (x, p) in candidates.items():
        statistics[name] = {"auroc_in_vs_out": auroc(x[inside], x[~inside])}
        if p is not None:  # A test: what it flags, and the "either" rule with it.
            f = p < ood.level
            rule = _either(calibrated, f)
            statistics[name].update(out_of_memory_flagged=float(f[~inside].mean()),
                                    in_memory_flagged=float(f[inside].mean()),
                                    either_auroc=auroc(rule[inside], rule[~inside]),
                                    either_coverage_at_risk_0_05=coverage_at_risk(risk_coverage(rule, correct), 0.05))
    methods = {}
    for method in CalibrationMethod:
        for score in ConfidenceScore:
            if score is ConfidenceScore.COMBINED and method is CalibrationMethod.ISOTONIC:
                continue  # Isotonic maps one score; the combined score has three inputs.
            fit = fit_on_confidence(c_vc, c_true, rule=RULE, k=k, method=method, score=score)
            conf = fit.confidence(vc)
            raw = raw_score(vc, score)
            raw_prob = (raw + 1) / 2 if score is ConfidenceScore.SIMILARITY else raw
            methods[f"{method.value}:{score.value}"] = {
                "ece_raw": expected_calibration_error(raw_prob[inside], correct[inside]),
                "ece_calibrated": expected_calibration_error(conf[inside], correct[inside]),
                "auroc_in_vs_out": auroc(conf[inside], conf[~inside]),
                "aurc_all_queries": risk_coverage(conf, correct).aurc}
    scores = {"share": vc.share, "margin": vc.margin, "similarity": vc.similarity,
              "kth_similarity": vc.kth_similarity, "calibrated": calibrated, "either": either,
              "either_flagged_by_p": _either(calibrated, flagged, p_out)}
    curves = {name: risk_coverage(v, correct) for name, v in scores.items()}
    in_curve = risk_coverage(calibrated[inside], correct[inside])
    levels = {}
    for level in LEVELS:
        product = calibrated * np.minimum(1.0, p_out / level)
        either = _either(calibrated, p_out < level)
        levels[str(level)] = {"product": _separation(product, correct, inside),
                              "either_coverage_at_risk_0.05": coverage_at_risk(risk_coverage(either, correct), 0.05),
                              "out_of_memory_flagged": float((p_out < level)[~inside].mean()),
                              "in_memory_flagged": float((p_out < level)[inside].mean())}
    gates = {}
    for p in THRESHOLDS:
        answered = (calibrated >= p) & ~flagged
        gates[str(p)] = {"coverage": float(answered.mean()),
                         "accuracy_of_answered": float(correct[answered].mean()) if answered.any() else None,
                         "out_of_memory_answered": int((answered & ~inside).sum()),
                         "in_memory_abstained": int((~answered & inside).sum()),
                         "out_of_memory_abstained_as_unlike_memory": int((~answered & ~inside & flagged).sum()),
                         "in_memory_abstained_as_unlike_memory": int((~answered & inside & flagged).sum())}
    # The Python API must abstain exactly where the neighbour lists say: same neighbours, same calibration, and
    # name the same reason.
    order = {qid: i for i, qid in enumerate(test.ids.tolist())}
    rows = np.asarray([order[r.query_id] for r in test_records])
    gate = THRESHOLDS[-2]
    predictions = vm.classify(test.embeddings[rows], rule=RULE, k=k, abstain_below=gate)
    expected_reason = np.where(flagged, AbstainReason.UNLIKE_MEMORY.value, AbstainReason.SPLIT_VOTE.value)
    api_mismatches = int(sum(p.abstained != (c < gate or f) for p, c, f in zip(predictions, calibrated.tolist(),
                                                                               flagged.tolist())))
    api_reason_mismatches = int(sum(p.abstained and p.abstain_reason.value != why
                                    for p, why in zip(predictions, expected_reason.tolist())))
    best_single = max(SINGLE_SCORES, key=lambda name: auroc(scores[name][inside], scores[name][~inside]))
    bins = reliability_bins(calibrated[inside], correct[inside])
    raw_bins = reliability_bins(vc.share[inside], correct[inside])
    results = {
        "held_out_classes": list(held), "rule": RULE, "k": k, "calibration": calibration.to_dict(),
        "queries": int(true.size), "in_memory_queries": int(inside.sum()), "out_of_memory_queries": int((~inside).sum()),
        "accuracy_in_memory": float(correct[inside].mean()),
        "ece_in_memory": {"raw_share": expected_calibration_error(vc.share[inside], correct[inside]),
                          "calibrated": expected_calibration_error(calibrated[inside], correct[inside])},
        "auroc_in_vs_out": {name: auroc(v[inside], v[~inside]) for name, v in scores.items()},
        "aurc_all_queries": {name: c.aurc for name, c in curves.items()},
        "aurc_in_memory_calibrated": in_curve.aurc,
        "risk_at_coverage_0.8": {name: risk_at_coverage(c, 0.8) for name, c in curves.items()},
        "coverage_at_risk_0.05": {name: coverage_at_risk(c, 0.05) for name, c in curves.items()},
        "out_of_memory_level": ood.level,
        "flagged_unlike_memory": {"out_of_memory": float(flagged[~inside].mean()),
                                  "in_memory": float(flagged[inside].mean())},
        "at_levels": levels,
        "best_single_score": best_single,
        "best_single_auroc": auroc(scores[best_single][inside], scores[best_single][~inside]),
        # The rule's in- vs out-of-memory decision is the test's: its separation is that of the test's statistic.
        # Flagging thresholds the statistic, so the test's ROC over levels is the statistic's.
        "out_of_memory_statistic": ood.statistic.value,
        "auroc_out_of_memory_test": auroc(ood.statistic_of(vc, ids)[inside], ood.statistic_of(vc, ids)[~inside]),
        "out_of_memory_statistics": statistics,
        "abstain_below": gates, "api_abstain_mismatches": api_mismatches,
        "api_reason_mismatches": api_reason_mismatches, "api_gate": gate,
        "methods": methods}
    os.makedirs(out, exist_ok=True)
    plot_lines(os.path.join(out, "risk_coverage.png"),
               {name: (c.coverage.tolist(), (100 * c.risk).tolist()) for name, c in curves.items()},
               xlabel="coverage (fraction of queries answered)", ylabel="risk (% of answers wrong)",
               title=f"{s.dataset}: risk-coverage, {', '.join(held)} out of memory")
    series = {"raw share": raw_bins, "calibrated": bins}
    plot_lines(os.path.join(out, "reliability.png"), {
        **{name: ((100 * b.mean_confidence[b.count > 0]).tolist(), (100 * b.accuracy[b.count > 0]).tolist())
           for name, b in series.items()},
        "perfect": ([0, 100], [0, 100])}, xlabel="confidence (%)", ylabel="accuracy (%)",
        title=f"{s.dataset}: reliability on in-memory test queries", styles={"perfect": ":"})
    lines = _markdown(results, calibration.describe(), held)
    write_report(out, name=NAME, setup=s, results=results, markdown="\n".join(lines), seconds=ws.seconds,
                 command=s.command(NAME))
    return results


def _markdown(results: dict, described: str, held: tuple[str, ...]) -> list[str]:
    ece = results["ece_in_memory"]
    flagged = results["flagged_unlike_memory"]
    lines = [f"Memory without {', '.join(held)}; calibration: {described}.", "",
             "| | raw share | calibrated |", "|---|---:|---:|",
             f"| ECE, in-memory test queries | {ece['raw_share']:.4f} | {ece['calibrated']:.4f} |", "",
             f"Out-of-memory test ({results['out_of_memory_statistic']}) at level "
             f"{results['out_of_memory_level']:g}: AUROC in vs out of memory "
             f"{results['auroc_out_of_memory_test']:.3f}; flags {pct(flagged['out_of_memory'])} % of out-of-memory "
             f"and {pct(flagged['in_memory'])} % of in-memory test queries. Best single score at AUROC: "
             f"{results['best_single_score']} ({results['best_single_auroc']:.3f}). `either` = abstain when either "
             "the test or the calibrated confidence says so (flagged queries last, the others by calibrated "
             "confidence; `either_flagged_by_p`: the flagged ones by the test's p-value).", "",
             "| score | AUROC in vs out of memory | AURC (all queries) | risk @ 80% coverage | coverage @ 5% risk |",
             "|---|---:|---:|---:|---:|"]
    for name in results["auroc_in_vs_out"]:
        lines.append(f"| {name} | {results['auroc_in_vs_out'][name]:.3f} | {results['aurc_all_queries'][name]:.4f} | "
                     f"{pct(results['risk_at_coverage_0.8'][name])} | {pct(results['coverage_at_risk_0.05'][name])} |")
    lines += ["", "| out-of-memory score (`test:` what `--out-of-memory-statistic` fits) | AUROC | flags out / in "
                  "memory | either: AUROC | either: coverage @ 5% risk |", "|---|---:|---:|---:|---:|"]
    for name, m in results["out_of_memory_statistics"].items():
        rest = (f"{pct(m['out_of_memory_flagged'])} / {pct(m['in_memory_flagged'])} | {m['either_auroc']:.3f} | "
                f"{pct(m['either_coverage_at_risk_0_05'])}" if "either_auroc" in m else "— | — | —")
        lines.append(f"| {name} | {m['auroc_in_vs_out']:.3f} | {rest} |")
    lines += ["", "| level | either: coverage @ 5% risk | product p_in * min(1, p / level): AUROC | ECE in-memory | "
                  "coverage @ 5% risk | out-of-memory flagged | in-memory flagged |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for level, m in results["at_levels"].items():
        prod = m["product"]
        lines.append(f"| {level} | {pct(m['either_coverage_at_risk_0.05'])} | {prod['auroc_in_vs_out']:.3f} | "
                     f"{prod['ece_in_memory']:.4f} | {pct(prod['coverage_at_risk_0.05'])} | "
                     f"{pct(m['out_of_memory_flagged'])} | {pct(m['in_memory_flagged'])} |")
    lines += ["", "| abstain below (either) | coverage | accuracy of answered | out-of-memory answered | "
                  "in-memory abstained | abstained as unlike memory: out / in |", "|---:|---:|---:|---:|---:|---:|"]
    for p, g in results["abstain_below"].items():
        acc = "—" if g["accuracy_of_answered"] is None else pct(g["accuracy_of_answered"])
        lines.append(f"| {p} | {pct(g['coverage'])} | {acc} | {g['out_of_memory_answered']} | "
                     f"{g['in_memory_abstained']} | {g['out_of_memory_abstained_as_unlike_memory']} / "
                     f"{g['in_memory_abstained_as_unlike_memory']} |")
    lines += ["", "| method:score | ECE raw | ECE calibrated | AUROC | AURC |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {m['ece_raw']:.4f} | {m['ece_calibrated']:.4f} | {m['auroc_in_vs_out']:.3f} | "
              f"{m['aurc_all_queries']:.4f} |" for name, m in results["methods"].items()]
    gate = results["api_gate"]
    lines += ["", f"`VisualMemory.classify(..., abstain_below={gate})` on the test embeddings abstained differently "
                  f"from the neighbour files on {results['api_abstain_mismatches']} queries and named another reason "
                  f"on {results['api_reason_mismatches']} (both must be 0)."]
    return lines
